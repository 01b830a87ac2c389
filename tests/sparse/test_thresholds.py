"""Thresholds at run time: exact zeroing (fp32 and bf16), JSON round trip, wrappers and input
pre-hooks that go on and come off leaving the model exactly as it was, peft-adapted layers."""

from __future__ import annotations

import json

import pytest
import torch
from sparse_tiny import batches, tiny_bert, tiny_llama
from torch import nn

from deftune.arch import find_activation_sites
from deftune.density import ActivationRecorder, measure_density
from deftune.sparse.calibrate import CalibrationConfig, MagnitudeHistogram, calibrate_thresholds
from deftune.sparse.thresholds import (
    InputThreshold,
    ThresholdedActivation,
    Thresholds,
    apply_thresholds,
    remove_thresholds,
    threshold_holders,
    thresholded,
)

torch.set_num_threads(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t", [0.25, 0.10001])
def test_wrapper_zeroes_exactly_the_small_entries(dtype, t):
    """0.10001 has no bf16 twin: 0.1 in bf16 (0.10009765625) is above it, so the comparison must be
    made in float32, not in the activation's dtype (where t would round to 0.1 and zero it)."""
    x = torch.tensor([[-2.0, -0.5, -0.25, 0.0, 0.1, 0.25, 0.2500001, 3.0]], dtype=dtype)
    wrapper = ThresholdedActivation(nn.Identity(), t)
    y = wrapper(x)
    keep = x.float().abs() > t
    assert torch.equal(y[keep], x[keep])
    assert torch.count_nonzero(y[~keep]) == 0
    assert y.dtype == dtype


def test_thresholds_json_round_trip(tmp_path):
    hist = MagnitudeHistogram.empty(CalibrationConfig())
    hist.add("decoder.0", torch.randn(1_000, generator=torch.Generator().manual_seed(5)))
    th = hist.thresholds(0.3)
    th.save(tmp_path / "th.json")
    assert Thresholds.load(tmp_path / "th.json") == th
    assert json.loads((tmp_path / "th.json").read_text())["overall_achieved"] == pytest.approx(
        th.overall_achieved
    )
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # atomic write left no temp file


def test_apply_and_remove_restore_originals():
    model = tiny_bert()
    originals = {s.module_path: model.get_submodule(s.module_path) for s in find_activation_sites(model)}
    keys = set(model.state_dict())
    th = calibrate_thresholds(model, batches(n=1), CalibrationConfig(target=0.5))
    paths = apply_thresholds(model, th)
    assert sorted(paths) == sorted(originals)
    assert set(model.state_dict()) == keys  # no new parameters or buffers
    apply_thresholds(model, th)  # re-applying updates, never double-wraps
    assert not any(
        isinstance(m.inner, ThresholdedActivation)
        for m in model.modules()
        if isinstance(m, ThresholdedActivation)
    )
    assert remove_thresholds(model) == len(originals)
    for path, module in originals.items():
        assert model.get_submodule(path) is module


def test_unknown_layer_is_rejected():
    model = tiny_bert()
    th = Thresholds(
        values={"encoder.7": 0.1},
        target=0.5,
        mode="layer",
        achieved={"encoder.7": 0.5},
        natural={"encoder.7": 1.0},
        elements={"encoder.7": 10},
    )
    with pytest.raises(KeyError, match="encoder.7"):
        apply_thresholds(model, th)


def test_gated_mlp_product_has_the_same_zeros():
    """For LLaMA the threshold acts on act(gate); the input of down_proj is zero in the same places."""
    model = tiny_llama()
    data = batches(n=1)
    th = calibrate_thresholds(model, data, CalibrationConfig(target=0.3))
    seen: dict[str, torch.Tensor] = {}
    mlp = model.model.layers[0].mlp
    with thresholded(model, th), torch.no_grad():
        assert isinstance(mlp.act_fn, ThresholdedActivation)
        hooks = [
            mlp.act_fn.register_forward_hook(lambda m, a, out: seen.__setitem__("act", out)),
            mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("prod", a[0])),
        ]
        try:
            model(**data[0])
        finally:
            for h in hooks:
                h.remove()
    zero_gate = seen["act"] == 0  # the thresholded act(gate)
    assert zero_gate.float().mean() > 0.5
    assert torch.equal(seen["prod"] == 0, zero_gate)


def test_product_site_thresholds_hook_the_down_projection_and_come_off():
    """site="product": the input of each down projection (act(gate) * up) is thresholded by a
    pre-hook; measured at that site the density equals the calibration's, the activated gate stays
    dense (SiLU), and removing the thresholds restores the model exactly."""
    model = tiny_llama()
    data = batches()
    with torch.no_grad():
        reference = [model(**b).logits for b in data]
    th = calibrate_thresholds(model, data, CalibrationConfig(target=0.4, site="product", refine_passes=1))
    assert th.site == "product" and all(t > 0 for t in th.values.values())
    paths = apply_thresholds(model, th)
    assert all(p.endswith("mlp.down_proj") for p in paths)
    holders = threshold_holders(model)
    assert len(holders) == 2 and all(isinstance(h, InputThreshold) for h in holders)
    product = measure_density(model, data, site="product")
    for name, value in product.exact_per_layer.items():  # 2 layers, 1 refinement pass: exact
        assert value == pytest.approx(th.achieved[name], abs=1e-9), name
    assert measure_density(model, data, site="act").overall > 0.99
    apply_thresholds(model, th)  # re-applying updates, never stacks hooks
    assert all(len(model.get_submodule(p)._forward_pre_hooks) == 1 for p in paths)
    assert remove_thresholds(model) == 2
    assert all(len(model.get_submodule(p)._forward_pre_hooks) == 0 for p in paths)
    assert not threshold_holders(model)
    with torch.no_grad():
        assert all(torch.equal(model(**b).logits, r) for b, r in zip(data, reference))
    with thresholded(model, th):  # the context manager takes its hooks off again
        assert len(threshold_holders(model)) == 2
    assert not threshold_holders(model)


def test_input_thresholds_run_ahead_of_a_recorder_attached_before_them():
    """A recorder attached first still measures the thresholded input (the hook is prepended)."""
    model = tiny_llama()
    data = batches(n=1)
    th = calibrate_thresholds(model, data, CalibrationConfig(target=0.4, site="product", refine_passes=1))
    with ActivationRecorder(model, site="product", thresholds=()) as rec:
        with thresholded(model, th), torch.no_grad():
            model(**data[0])
        density = rec.result()
    for name, value in density.exact_per_layer.items():
        assert value == pytest.approx(th.achieved[name], abs=1e-9), name


def test_product_site_thresholds_sit_on_a_lora_adapted_down_projection():
    """Calibrated on the base model, applied after peft wrapped ``down_proj``: the hook goes on the
    adapted module, so base and LoRA paths both see the zeros."""
    from peft import LoraConfig, get_peft_model

    model = tiny_llama()
    data = batches()
    th = calibrate_thresholds(model, data, CalibrationConfig(target=0.5, site="product", refine_passes=0))
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["down_proj", "q_proj"], init_lora_weights=False))
    paths = apply_thresholds(peft_model, th)
    assert all(type(peft_model.get_submodule(p)).__name__ == "Linear" and "lora" in type(peft_model.get_submodule(p)).__module__
               for p in paths)
    assert 0.3 < measure_density(peft_model, data, site="product").overall < 0.7
    seen = []
    hook = peft_model.get_submodule(paths[0]).lora_A["default"].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        peft_model(**data[0])
    hook.remove()
    assert (seen[0] == 0).float().mean() > 0.3  # the LoRA path reads the thresholded input


def test_a_bad_value_leaves_every_layer_unthresholded():
    """Values are checked before the first layer is wrapped (the NaN sits on the second layer)."""
    model = tiny_bert()
    names = [s.name for s in find_activation_sites(model)]
    th = Thresholds(values={names[0]: 0.1, names[1]: float("nan")}, target=0.5, mode="layer",
                    achieved={}, natural={}, elements={})
    with pytest.raises(ValueError, match=f"threshold of {names[1]} must be finite and >= 0, got nan"):
        apply_thresholds(model, th)
    assert not any(isinstance(m, ThresholdedActivation) for m in model.modules())


@pytest.mark.parametrize("site", ["act", "product"])
def test_thresholded_gives_back_thresholds_that_were_already_installed(site):
    """A model already thresholded at 0.3 runs at the block's 0.05 and leaves it at 0.3 again, with
    the same wrapper objects / hooks, also when the block raises; sites it did not touch stay."""
    model = tiny_llama()
    names = [s.name for s in find_activation_sites(model, site)]

    def table(values):
        return Thresholds(values=values, target=0.5, mode="layer", achieved={}, natural={}, elements={},
                          site=site)

    apply_thresholds(model, table({n: 0.3 for n in names}))
    holders = threshold_holders(model)
    with thresholded(model, table({names[0]: 0.05})):
        assert [h.threshold for h in threshold_holders(model)] == [0.05, 0.3]
    assert threshold_holders(model) == holders
    assert [h.threshold for h in holders] == [0.3, 0.3]
    with pytest.raises(RuntimeError, match="boom"), thresholded(model, table({n: 0.01 for n in names})):
        raise RuntimeError("boom")
    assert threshold_holders(model) == holders
    assert [h.threshold for h in holders] == [0.3, 0.3]
    remove_thresholds(model)
    with thresholded(model, table({names[1]: 0.2})):  # nothing installed before: nothing after
        assert len(threshold_holders(model)) == 1
    assert not threshold_holders(model)
