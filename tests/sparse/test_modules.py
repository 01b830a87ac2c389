"""Drop-in sparse MLP modules on tiny random Hugging Face models built from configs."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel, GPT2Config, GPT2Model, LlamaConfig, LlamaForCausalLM

from deftune.arch import find_activation_sites
from deftune.sparse import (
    SparseGatedMLP,
    SparseInputLinear,
    SparseMLPConfig,
    SparseThresholdedActivation,
    restore_mlps_,
    sparse_modules,
    sparsify_mlps_,
)

torch.set_num_threads(1)


def _llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=101,
        hidden_size=48,
        intermediate_size=97,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


def _bert(seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=101,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=97,
        max_position_embeddings=64,
    )
    return BertModel(cfg).eval()


def _gpt2(seed: int = 0) -> GPT2Model:
    torch.manual_seed(seed)
    return GPT2Model(GPT2Config(vocab_size=101, n_embd=48, n_layer=2, n_head=4, n_positions=64)).eval()


def _t5(feed_forward_proj: str):
    def build(seed: int = 0):
        from transformers import T5Config, T5EncoderModel

        torch.manual_seed(seed)
        return T5EncoderModel(T5Config(vocab_size=101, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                       feed_forward_proj=feed_forward_proj)).eval()

    return build


BUILDERS = {"llama": _llama, "bert": _bert, "gpt2": _gpt2, "t5": _t5("relu"), "t5-gated": _t5("gated-gelu")}


def _out(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        result = model(input_ids=ids)
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


def _hook_masked(model: nn.Module, ids: torch.Tensor, thresholds: dict[str, float]) -> torch.Tensor:
    """Reference: the unwrapped model with every activation output masked by a forward hook."""
    handles = []
    try:
        for site in find_activation_sites(model):
            t = thresholds[site.name]
            act = model.get_submodule(site.module_path)
            handles.append(act.register_forward_hook(lambda m, i, o, t=t: torch.where(o.abs() > t, o, 0.0)))
        return _out(model, ids)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_threshold_zero_equals_the_original_model(arch):
    model = BUILDERS[arch]()
    ids = torch.randint(0, 101, (2, 7))
    expected = _out(model, ids)
    sparsify_mlps_(model, 0.0)
    torch.testing.assert_close(_out(model, ids), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_per_layer_thresholds_equal_masked_activations(arch):
    model = BUILDERS[arch]()
    ids = torch.randint(0, 101, (2, 7))
    names = [s.name for s in find_activation_sites(model)]
    thresholds = {name: 0.05 * (i + 1) for i, name in enumerate(names)}
    expected = _hook_masked(model, ids, thresholds)
    dense = _out(model, ids)
    sparsify_mlps_(model, thresholds)
    got = _out(model, ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, dense, atol=1e-4), "thresholds had no effect: the test could not fail"


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_restore_gives_back_the_original_modules(arch):
    model = BUILDERS[arch]()
    before = dict(model.named_modules())
    keys = list(model.state_dict())
    replaced = sparsify_mlps_(model, 0.1)
    assert replaced and all(
        isinstance(model.get_submodule(p), (SparseGatedMLP, SparseThresholdedActivation, SparseInputLinear))
        for p in replaced
    )
    assert restore_mlps_(model) == len(replaced)
    after = dict(model.named_modules())
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert list(model.state_dict()) == keys and not sparse_modules(model)


def test_llama_wraps_whole_mlp_and_bert_wraps_act_and_down():
    llama, bert = _llama(), _bert()
    assert sparsify_mlps_(llama, 0.1) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert sparsify_mlps_(bert, 0.1) == [
        "encoder.layer.0.intermediate.intermediate_act_fn",
        "encoder.layer.0.output.dense",
        "encoder.layer.1.intermediate.intermediate_act_fn",
        "encoder.layer.1.output.dense",
    ]
    assert llama.model.layers[0].mlp.activation == "silu"


def test_threshold_validation_and_double_sparsify():
    model = _llama()
    with pytest.raises(ValueError, match=r"missing \['decoder.1'\]"):
        sparsify_mlps_(model, {"decoder.0": 0.1})
    with pytest.raises(ValueError, match=r"unknown \['decoder.9'\]"):
        sparsify_mlps_(model, {"decoder.0": 0.1, "decoder.1": 0.1, "decoder.9": 0.1})
    with pytest.raises(ValueError, match="threshold must be finite and >= 0, got -1.0"):
        sparsify_mlps_(model, -1.0)
    assert not sparse_modules(model), "a failed call must leave the model unchanged"
    sparsify_mlps_(model, 0.1)
    with pytest.raises(ValueError, match="already sparsified"):
        sparsify_mlps_(model, 0.1)


def test_training_mode_falls_back_to_the_differentiable_reference():
    model = _llama().train()
    sparsify_mlps_(model, 0.05)
    loss = model(input_ids=torch.randint(0, 101, (1, 5))).logits.square().mean()
    loss.backward()
    assert model.model.layers[0].mlp.base.up_proj.weight.grad is not None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_llama_decode_step_triton_equals_reference_on_gpu():
    model = _llama().to("cuda", torch.bfloat16)
    ids = torch.randint(0, 101, (3, 1), device="cuda")  # 3 rows of one token: the decoding shape
    names = [s.name for s in find_activation_sites(model)]
    thresholds = {n: 0.02 for n in names}
    sparsify_mlps_(model, thresholds, SparseMLPConfig(backend="reference"))
    ref = _out(model, ids).float()
    restore_mlps_(model)
    sparsify_mlps_(model, thresholds, SparseMLPConfig(backend="triton"))
    got = _out(model, ids).float()
    assert torch.isfinite(got).all()
    assert float((got - ref).norm() / ref.norm()) < 2e-2


def test_calibrated_thresholds_object_is_accepted_and_its_site_checked():
    from deftune.sparse import Thresholds

    names = [s.name for s in find_activation_sites(_llama())]
    th = Thresholds({n: 0.1 for n in names}, 0.5, "layer", {}, {}, {}, site="product")
    with pytest.raises(ValueError, match="calibrated at site 'product'"):
        sparsify_mlps_(_llama(), th)
    model = _llama()
    ids = torch.randint(0, 101, (2, 7))
    expected = _hook_masked(model, ids, {n: 0.1 for n in names})
    sparsify_mlps_(model, Thresholds({n: 0.1 for n in names}, 0.5, "layer", {}, {}, {}, site="act"))
    torch.testing.assert_close(_out(model, ids), expected, rtol=1e-5, atol=1e-5)


def test_reference_threshold_compares_half_precision_in_float32():
    """bf16 rounds 0.10001 up to 0.10009765625; the comparison must not: that value stays."""
    from deftune.sparse.reference import threshold_activation

    a = torch.tensor([0.10009765625, -0.10009765625, 0.099609375], dtype=torch.bfloat16)
    assert threshold_activation(a, 0.10001).tolist() == [0.10009765625, -0.10009765625, 0.0]
    assert threshold_activation(a.float(), 0.10001).tolist() == pytest.approx([0.10009765625, -0.10009765625, 0.0])


def test_activation_names_cover_tanh_gelu():
    from transformers.activations import ACT2FN

    from deftune.sparse.modules import activation_name

    assert activation_name(nn.GELU(approximate="tanh")) == "gelu_tanh"
    assert activation_name(nn.GELU()) == "gelu"
    assert activation_name(ACT2FN["gelu_pytorch_tanh"]) == "gelu_tanh"  # Gemma's
    assert activation_name(nn.Tanh()) is None


def test_an_unnamed_activation_is_kept_as_the_mlps_own():
    """An activation without a kernel name runs as the module itself: at t = 0 the wrapped MLP is
    the original one."""
    model = _llama()
    for layer in model.model.layers:
        layer.mlp.act_fn = nn.Tanh()
    ids = torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(0))
    expected = _out(model, ids)
    sparsify_mlps_(model, 0.0)
    torch.testing.assert_close(_out(model, ids), expected, rtol=1e-5, atol=1e-6)


def test_a_subclassed_projection_is_refused_and_nothing_stays_wrapped():
    """A Linear subclass (an adapter or quantized layer) would lose its own forward: refused, and a
    failure on a later layer unwraps the earlier ones."""

    class Adapted(nn.Linear):
        pass

    model = _llama()
    old = model.model.layers[1].mlp.down_proj
    new = Adapted(old.in_features, old.out_features, bias=False)
    model.model.layers[1].mlp.down_proj = new
    with pytest.raises(NotImplementedError, match="down_proj is a Adapted"):
        sparsify_mlps_(model, 0.1)
    assert not sparse_modules(model)
