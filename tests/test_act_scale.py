"""Learned activation scales: identity at init, exact zeros when sharpened, save/load, folding."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import batch, randomise_affine, tiny_bert

from deftune.act_scale import (
    ScaledActivation,
    act_scale_state,
    add_act_scales,
    fold_act_scales,
    load_act_scales,
    remove_act_scales,
    scaled_activations,
)
from deftune.density import measure_density
from deftune.methods import MethodConfig, apply_method, load_adapter, save_adapter


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1)
    return LlamaForCausalLM(cfg).eval()


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2)).eval()


def _out(model, b):
    with torch.no_grad():
        return model(**b).logits


@pytest.mark.parametrize("granularity, features", [("layer", 1), ("neuron", 37)])
def test_identity_at_init_and_shapes(granularity, features):
    model, b = tiny_bert(), batch()
    before = _out(model, b)
    wrappers = add_act_scales(model, granularity)
    assert len(wrappers) == 2
    assert all(w.log_scale.shape == (features,) and w.log_scale.requires_grad for w in wrappers.values())
    torch.testing.assert_close(_out(model, b), before)
    remove_act_scales(model)
    assert not scaled_activations(model)


def test_rejects_unknown_granularity_and_double_wrapping():
    model = tiny_bert()
    with pytest.raises(ValueError, match="granularity must be one of"):
        add_act_scales(model, "channel")
    add_act_scales(model)
    with pytest.raises(ValueError, match="already has activation scales"):
        add_act_scales(model)


def test_sharpening_turns_gelu_negatives_into_exact_zeros():
    x = torch.linspace(-3, 3, 601)
    w = ScaledActivation(torch.nn.GELU(), 1)
    assert (w(x) == 0).sum() == 0  # GELU is exactly zero only below about -5.5
    with torch.no_grad():
        w.log_scale.fill_(torch.log(torch.tensor(30.0)).item())
    y = w(x)
    assert (y[x < -0.2] == 0).all()  # 30 * -0.2 = -6 < -5.5
    torch.testing.assert_close(y[x > 0.5], x[x > 0.5], atol=1e-6, rtol=0)  # ≈ relu on the positive side


def test_density_loss_gradient_raises_the_scale():
    from deftune import DensityLossConfig, DensityRegularizer

    model = tiny_bert()
    add_act_scales(model)
    reg = DensityRegularizer(model, DensityLossConfig(alpha=1.0, eps=1e-3))
    with reg:
        out = model(**batch(), labels=torch.tensor([0, 1, 0]))
        total, parts = reg.total_loss(0.0 * out.loss, 0)  # the density term alone
    total.backward()
    grads = [w.log_scale.grad for w in scaled_activations(model).values()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all((g < 0).all() for g in grads)  # gradient descent increases log s: sharper, sparser


@pytest.mark.parametrize("build", [tiny_bert, _tiny_llama, _tiny_gpt2], ids=["bert", "llama", "gpt2"])
@pytest.mark.parametrize("granularity", ["layer", "neuron"])
def test_fold_preserves_outputs_and_zeros(build, granularity):
    model = randomise_affine(build())  # the fold must rescale the up projection's bias too
    b = batch()
    wrappers = add_act_scales(model, granularity)
    torch.manual_seed(1)
    with torch.no_grad():
        for w in wrappers.values():
            w.log_scale.copy_(torch.rand_like(w.log_scale) * 3)  # s in [1, 20]
    expected = _out(model, b)
    density = measure_density(model, [b]).overall
    assert fold_act_scales(model) == 2
    assert not scaled_activations(model)
    torch.testing.assert_close(_out(model, b), expected, rtol=1e-4, atol=1e-4)
    assert measure_density(model, [b]).overall == pytest.approx(density, abs=0.02)


def test_fold_refuses_unmerged_lora():
    model = apply_method(tiny_bert(), MethodConfig("lora", target_modules=("intermediate.dense",), act_scale="layer"))
    with pytest.raises(TypeError, match="merge_and_unload"):
        fold_act_scales(model)


@pytest.mark.parametrize("name", ["lora", "bitfit", "adapter", "full"])
def test_method_save_load_keeps_scales(tmp_path, name):
    model = apply_method(tiny_bert(), MethodConfig(name, act_scale="neuron"))
    with torch.no_grad():
        for w in scaled_activations(model).values():
            w.log_scale.uniform_(0, 2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.endswith("log_scale") for n in trainable)
    b = batch()
    expected = _out(model, b)
    save_adapter(model, tmp_path)
    assert (tmp_path / "act_scales.safetensors").exists()
    loaded = load_adapter(tiny_bert(), tmp_path)
    torch.testing.assert_close(_out(loaded, b), expected)
    state = act_scale_state(loaded)
    assert all(not w.log_scale.requires_grad for w in scaled_activations(loaded).values())
    with pytest.raises(ValueError, match="do not fit"):
        load_act_scales(loaded, {k + ".x": v for k, v in state.items()})
    with pytest.raises(ValueError, match=r"saved scale shape \(1,\) != "):  # no silent broadcast
        load_act_scales(loaded, {k: torch.zeros(1) for k in state})


def _thresholds(model, t: float = 0.05):
    from deftune.arch import find_activation_sites
    from deftune.sparse import Thresholds

    names = [s.name for s in find_activation_sites(model)]
    return Thresholds({n: t for n in names}, 0.5, "layer", {}, {}, {})


def test_scales_save_load_and_fold_under_thresholds(tmp_path):
    """The threshold route wraps the scaled activation (``.inner``): the scales keep their site keys,
    so a run saved with thresholds on loads onto a fresh base, and folding keeps the thresholds."""
    from deftune.sparse import ThresholdedActivation, apply_thresholds

    model = apply_method(tiny_bert(), MethodConfig("lora", act_scale="layer"))
    with torch.no_grad():
        for w in scaled_activations(model).values():
            w.log_scale.uniform_(0, 2)
    apply_thresholds(model, _thresholds(model))
    b = batch()
    expected = _out(model, b)
    keys = list(act_scale_state(model))
    assert keys and not any(k.endswith(".inner") for k in keys)
    save_adapter(model, tmp_path)
    loaded = load_adapter(tiny_bert(), tmp_path)
    apply_thresholds(loaded, _thresholds(loaded))
    torch.testing.assert_close(_out(loaded, b), expected)
    # a save made before the keys dropped ".inner" still loads
    load_act_scales(loaded, {k + ".inner": v for k, v in act_scale_state(loaded).items()})

    plain = tiny_bert()
    add_act_scales(plain, "layer")
    with torch.no_grad():
        for w in scaled_activations(plain).values():
            w.log_scale.uniform_(0, 2)
    apply_thresholds(plain, _thresholds(plain))
    before = _out(plain, b)
    assert fold_act_scales(plain) == 2
    assert not scaled_activations(plain)
    assert sum(isinstance(m, ThresholdedActivation) for m in plain.modules()) == 2
    torch.testing.assert_close(_out(plain, b), before, rtol=1e-4, atol=1e-4)


def test_fold_into_a_merged_identity_bottleneck_adapter():
    from deftune.methods import merge_adapter

    model = apply_method(tiny_bert(), MethodConfig("adapter", adapter_activation="identity", act_scale="layer"))
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adapter_" in name:
                p.normal_(0, 0.1)
        for w in scaled_activations(model).values():
            w.log_scale.uniform_(0, 2)
    b = batch()
    expected = _out(model, b)
    merge_adapter(model)
    assert fold_act_scales(model) == 2
    torch.testing.assert_close(_out(model, b), expected, rtol=1e-4, atol=1e-4)


def test_method_config_validates_act_scale():
    with pytest.raises(ValueError, match="act_scale must be one of"):
        MethodConfig("lora", act_scale="global")


def test_train_config_puts_scales_in_their_own_lr_group():
    from deftune.train.config import TrainConfig
    from deftune.train.loop import _param_groups

    model = apply_method(tiny_bert(), MethodConfig("lora", act_scale="layer"))
    cfg = TrainConfig(lr=1e-3, scale_lr=0.1)
    groups = _param_groups(model, cfg, [])
    scale_ids = {id(w.log_scale) for w in scaled_activations(model).values()}
    (group,) = [g for g in groups if {id(p) for p in g["params"]} == scale_ids]
    assert group["lr"] == 0.1
    with pytest.raises(ValueError, match="scale_lr"):
        TrainConfig(scale_lr=-1.0)


def _task_and_density_grads(grad: str):
    """``(θ grads of the task loss alone, θ grads of the density loss alone, logits)`` of a tiny BERT."""
    from deftune import DensityLossConfig, DensityRegularizer

    grads = []
    for part in ("task", "density"):
        model = tiny_bert()
        add_act_scales(model, grad=grad)
        with torch.no_grad():
            for w in scaled_activations(model).values():
                w.log_scale.fill_(0.7)
        reg = DensityRegularizer(model, DensityLossConfig(alpha=1.0, eps=1e-3))
        with reg:
            out = model(**batch(), labels=torch.tensor([0, 1, 0]))
            total, _ = reg.total_loss(out.loss if part == "task" else 0.0 * out.loss, 0)
            if part == "task":
                total = out.loss  # the task loss alone (the density term built, then dropped)
        total.backward()
        grads.append([w.log_scale.grad for w in scaled_activations(model).values()])
    return grads[0], grads[1], out.logits.detach()


def test_density_only_scales_take_no_task_gradient_and_keep_the_values():
    task_all, density_all, logits_all = _task_and_density_grads("all")
    task_only, density_only, logits_only = _task_and_density_grads("density")
    assert all(g is not None and g.abs().max() > 0 for g in task_all)  # the default: the task loss moves θ
    assert all(g is None or not g.any() for g in task_only)  # density-only: it does not
    assert all((g < 0).all() for g in density_only)  # the density loss raises s
    # its own layer's density term moves θ the same either way; the default also passes the
    # density terms of later layers back through the model into θ, density-only does not
    torch.testing.assert_close(density_only[-1], density_all[-1])
    assert not torch.allclose(density_only[0], density_all[0])
    torch.testing.assert_close(logits_only, logits_all, rtol=0, atol=0)


def test_density_only_scales_are_listed_and_validated():
    from deftune.act_scale import density_only_scales

    model = tiny_bert()
    add_act_scales(model)
    assert density_only_scales(model) == []
    with pytest.raises(ValueError, match="act_scale_grad must be one of"):
        add_act_scales(tiny_bert(), grad="task")
    model = apply_method(tiny_bert(), MethodConfig("lora", act_scale="layer", act_scale_grad="density"))
    assert len(density_only_scales(model)) == 2
    assert "density_only=True" in repr(model)
    with pytest.raises(ValueError, match="needs learned scales"):
        MethodConfig("lora", act_scale_grad="density")
    with pytest.raises(ValueError, match="act_scale_grad must be one of"):
        MethodConfig("lora", act_scale="layer", act_scale_grad="task")


def test_density_only_scales_survive_save_and_load(tmp_path):
    model = apply_method(tiny_bert(), MethodConfig("lora", act_scale="layer", act_scale_grad="density"))
    with torch.no_grad():
        for w in scaled_activations(model).values():
            w.log_scale.fill_(1.5)
    save_adapter(model, tmp_path)
    loaded = load_adapter(tiny_bert(), tmp_path, trainable=True)
    assert all(w.density_only for w in scaled_activations(loaded).values())
    torch.testing.assert_close(_out(loaded, batch()), _out(model, batch()))


def test_density_only_view_is_the_output_itself_where_no_gradient_is_wanted():
    from deftune.density import ActivationRecorder

    model = apply_method(tiny_bert(), MethodConfig("lora", act_scale="layer", act_scale_grad="density"))
    w = next(iter(scaled_activations(model).values()))
    x = torch.randn(2, 3, 37)
    out = w(x)
    assert w.density_output(x, out) is not out  # training: a view with a gradient path into s
    with torch.no_grad():
        assert w.density_output(x, out) is out  # no gradients: nothing recomputed
    calls = []
    original = type(w).density_output
    try:  # a recorder that only measures (no loss_fn) never asks for the view
        type(w).density_output = lambda self, x, o: calls.append(1) or original(self, x, o)
        with ActivationRecorder(model):
            model(**batch())
        assert not calls
    finally:
        type(w).density_output = original


def test_density_only_scales_take_the_density_gradient_through_thresholds():
    """On the threshold route the recorder sees ThresholdedActivation(ScaledActivation): the wrapper
    passes the scales' density view on, thresholded, so the scales still get their gradient."""
    from deftune import DensityLossConfig, DensityRegularizer
    from deftune.sparse import Thresholds, apply_thresholds

    model = tiny_bert()
    add_act_scales(model, grad="density")
    with torch.no_grad():
        for w in scaled_activations(model).values():
            w.log_scale.fill_(0.7)
    apply_thresholds(model, Thresholds(values={"encoder.0": 1e-3, "encoder.1": 1e-3}, target=0.5, mode="layer",
                                       achieved={}, natural={}, elements={}))
    reg = DensityRegularizer(model, DensityLossConfig(alpha=1.0, eps=1e-3))
    with reg:
        out = model(**batch(), labels=torch.tensor([0, 1, 0]))
        total, _ = reg.total_loss(0.0 * out.loss, 0)
    total.backward()
    grads = [w.log_scale.grad for w in scaled_activations(model).values()]
    assert all(g is not None and (g < 0).all() for g in grads)


def test_per_neuron_scales_do_not_fold_under_a_layer_threshold():
    from deftune.sparse import apply_thresholds

    model = tiny_bert()
    add_act_scales(model, "neuron")
    apply_thresholds(model, _thresholds(model))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="per-neuron scales cannot fold under the layer threshold"):
        fold_act_scales(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
