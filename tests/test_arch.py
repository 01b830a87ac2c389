"""Every registered architecture, proven on a tiny random config."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from torch import nn

from deftune.arch import (
    ActivationSite,
    ArchSpec,
    SitePattern,
    UnsupportedArchitectureError,
    find_activation_sites,
    register_architecture,
)
from deftune.density import ActivationRecorder

SMALL = dict(vocab_size=100)
CASES = {
    "bert": (T.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, **SMALL), T.AutoModel, ["encoder.0", "encoder.1"], 37),
    "roberta": (T.RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, **SMALL), T.AutoModel, ["encoder.0", "encoder.1"], 37),
    "distilbert": (T.DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=37, **SMALL), T.AutoModel, ["encoder.0", "encoder.1"], 37),
    "electra": (T.ElectraConfig(hidden_size=32, embedding_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, **SMALL), T.AutoModel, ["encoder.0", "encoder.1"], 37),
    "t5-relu": (T.T5Config(d_model=32, d_ff=37, num_layers=2, num_decoder_layers=3, num_heads=2, d_kv=8, decoder_start_token_id=0, pad_token_id=0, **SMALL), T.AutoModelForSeq2SeqLM, ["encoder.0", "encoder.1", "decoder.0", "decoder.1", "decoder.2"], 37),
    "flan-t5-gated-gelu": (T.T5Config(d_model=32, d_ff=37, num_layers=2, num_heads=2, d_kv=8, decoder_start_token_id=0, pad_token_id=0, feed_forward_proj="gated-gelu", **SMALL), T.AutoModelForSeq2SeqLM, ["encoder.0", "encoder.1", "decoder.0", "decoder.1"], 37),
    "gpt2": (T.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_inner=37, bos_token_id=0, eos_token_id=0, **SMALL), T.AutoModelForCausalLM, ["decoder.0", "decoder.1"], 37),
    "opt": (T.OPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=37, word_embed_proj_dim=32, **SMALL), T.AutoModelForCausalLM, ["decoder.0", "decoder.1"], 37),
    "llama": (T.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, **SMALL), T.AutoModelForCausalLM, ["decoder.0", "decoder.1"], 37),
    "mistral": (T.MistralConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, intermediate_size=37, **SMALL), T.AutoModelForCausalLM, ["decoder.0", "decoder.1"], 37),
    "qwen2": (T.Qwen2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, intermediate_size=37, **SMALL), T.AutoModelForCausalLM, ["decoder.0", "decoder.1"], 37),
    "gemma": (T.GemmaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, intermediate_size=37, head_dim=16, **SMALL), T.AutoModelForCausalLM, ["decoder.0", "decoder.1"], 37),
}


def _inputs(model, b=2, t=5):
    ids = torch.randint(1, 100, (b, t))
    inputs = {"input_ids": ids, "attention_mask": torch.ones(b, t, dtype=torch.long)}
    if model.config.is_encoder_decoder:
        inputs["labels"] = torch.randint(1, 100, (b, 4))
    return inputs


@pytest.mark.parametrize("case", sorted(CASES))
def test_sites_found_and_fire_once(case):
    config, auto, names, features = CASES[case]
    torch.manual_seed(0)
    model = auto.from_config(config).eval()
    for site in ("act", "product"):
        sites = find_activation_sites(model, site)
        assert [s.name for s in sites] == names
        modules = dict(model.named_modules())
        assert len({id(modules[s.module_path]) for s in sites}) == len(sites)  # no shared module
        with ActivationRecorder(model, sites) as rec:
            with torch.no_grad():
                model(**_inputs(model))
        result = rec.result()
        assert list(result.per_layer) == names
        assert all(layer.features == features for layer in result.per_layer.values())
        dec_tokens = 4 if model.config.is_encoder_decoder else 5
        for s in sites:  # each site fired exactly once per example token
            expected = 2 * (dec_tokens if s.stack == "decoder" and model.config.is_encoder_decoder else 5)
            assert result.per_layer[s.name].tokens == expected


def test_gated_product_site_differs_from_act():
    config, auto, _, _ = CASES["llama"]
    model = auto.from_config(config)
    act = find_activation_sites(model, "act")
    prod = find_activation_sites(model, "product")
    assert act[0].module_path.endswith("mlp.act_fn") and act[0].hook == "output"
    assert prod[0].module_path.endswith("mlp.down_proj") and prod[0].hook == "input"
    assert act[0].mlp_path == prod[0].mlp_path


def test_dense_t5_product_is_act_site():
    config, auto, _, _ = CASES["t5-relu"]
    model = auto.from_config(config)
    assert find_activation_sites(model, "product") == find_activation_sites(model, "act")


def test_sites_survive_peft_wrapping(bert):
    from peft import LoraConfig, get_peft_model

    plain = [s.name for s in find_activation_sites(bert)]
    wrapped = get_peft_model(bert, LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"]))
    sites = find_activation_sites(wrapped)
    assert [s.name for s in sites] == plain
    assert all(s.module_path.startswith("base_model.model.") for s in sites)


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = type("C", (), {"model_type": "toy-unregistered"})()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))])


def test_unsupported_architecture_error_is_helpful():
    with pytest.raises(UnsupportedArchitectureError) as err:
        find_activation_sites(_Toy())
    msg = str(err.value)
    assert "_Toy" in msg and "toy-unregistered" in msg and "bert" in msg and "register_architecture" in msg


def test_register_custom_pattern_and_callable():
    spec = register_architecture(
        ArchSpec(family="toy", model_types=("toy-unregistered",),
                 act=SitePattern(r"(?P<mlp>blocks\.(?P<layer>\d+))\.1$"), down_proj="2"),
        overwrite=True,
    )
    sites = find_activation_sites(_Toy())
    assert [(s.name, s.module_path, s.mlp_path) for s in sites] == [("encoder.0", "blocks.0.1", "blocks.0")]
    with pytest.raises(ValueError, match="already registered"):
        register_architecture(spec)

    def finder(model, site):
        return [ActivationSite("decoder.0", "decoder", 0, "blocks.0.1", "output", "blocks.0")]

    register_architecture(ArchSpec(family="toy2", model_types=("toy-unregistered",), act=spec.act, finder=finder), overwrite=True)
    assert find_activation_sites(_Toy())[0].stack == "decoder"


def test_bad_site_kind():
    with pytest.raises(ValueError, match="product"):
        find_activation_sites(_Toy(), "gate")  # type: ignore[arg-type]


def _linear_dims(module: nn.Module) -> tuple[int, int]:
    """(in, out) of an nn.Linear or a GPT-2 Conv1D."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.weight.shape[0], module.weight.shape[1]  # Conv1D stores (in, out)


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_family_names_its_activation_down_and_up_projections(case):
    """The hooked activation is the activation module (not a Linear), the down projection reads the
    d_ff features, and the first ``act_input`` module (the gate of gated MLPs) writes them."""
    from deftune.arch import arch_spec

    config, auto, _, d_ff = CASES[case]
    torch.manual_seed(0)
    model = auto.from_config(config).eval()
    spec = arch_spec(model)
    for site in find_activation_sites(model, "act"):
        module = model.get_submodule(site.module_path)
        if site.hook == "output":
            assert not hasattr(module, "weight"), f"{site.module_path} is not an activation module"
        down = model.get_submodule(f"{site.mlp_path}.{spec.down_proj}")
        assert _linear_dims(down)[0] == d_ff, (case, spec.down_proj)
        mlp = model.get_submodule(site.mlp_path)
        first = next(name for name in spec.act_input if hasattr(mlp, name) or "." in name)
        up = model.get_submodule(f"{site.mlp_path}.{first}")
        assert _linear_dims(up)[1] == d_ff, (case, first)
        if case == "flan-t5-gated-gelu":
            assert first == "wi_0"  # the gate, whose output is activated (wi_1 is the up projection)


def test_gated_t5_product_site_is_the_product_before_dropout():
    """act(wi_0 x) * wi_1 x, hooked before T5's dropout: in training the dropout's zeros are not
    sparsity (they would count as such at wo's input) and its 1/(1-p) scaling not the activation."""
    from deftune.density import ActivationRecorder

    config, auto, _, _ = CASES["flan-t5-gated-gelu"]
    torch.manual_seed(0)
    model = auto.from_config(config.__class__(**{**config.to_dict(), "dropout_rate": 0.5})).train()
    sites = find_activation_sites(model, "product")
    assert all(s.module_path.endswith("DenseReluDense.dropout") and s.hook == "input" for s in sites)
    ids = torch.randint(1, config.vocab_size, (2, 5))
    with torch.no_grad(), ActivationRecorder(model, site="product") as rec:
        model(input_ids=ids, decoder_input_ids=ids)
    assert rec.result().overall == 1.0  # GELU products: no exact zeros, dropout or not
    mlp = model.get_submodule(sites[0].mlp_path)
    x = torch.randn(2, 5, config.d_model)
    seen = {}
    handle = mlp.get_submodule("dropout").register_forward_pre_hook(lambda m, a: seen.setdefault("a", a[0]))
    try:
        mlp(x)
    finally:
        handle.remove()
    torch.testing.assert_close(seen["a"], mlp.act(mlp.wi_0(x)) * mlp.wi_1(x))


def test_phi3_fused_gate_up_is_found_and_its_scales_refuse_to_fold():
    from deftune.act_scale import add_act_scales, fold_act_scales

    torch.manual_seed(0)
    model = T.Phi3ForCausalLM(T.Phi3Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                           num_key_value_heads=2, intermediate_size=37, pad_token_id=0,
                                           **SMALL))
    sites = find_activation_sites(model)
    assert [s.name for s in sites] == ["decoder.0", "decoder.1"]
    mlp = model.get_submodule(sites[0].mlp_path)
    x = torch.randn(1, 3, 32)
    gate = mlp.gate_up_proj(x).chunk(2, dim=-1)[0]
    out = {}
    handle = model.get_submodule(sites[0].module_path).register_forward_hook(lambda m, a, o: out.setdefault("a", o))
    try:
        mlp(x)
    finally:
        handle.remove()
    torch.testing.assert_close(out["a"], mlp.activation_fn(gate))  # the activated gate branch
    assert find_activation_sites(model, "product")[0].module_path.endswith("mlp.down_proj")
    add_act_scales(model)
    with pytest.raises(ValueError, match="cannot fold activation scales for family 'phi3'"):
        fold_act_scales(model)


def test_gemma2_is_registered():
    model = T.Gemma2ForCausalLM(T.Gemma2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                               num_key_value_heads=1, intermediate_size=37, head_dim=16, **SMALL))
    assert [s.name for s in find_activation_sites(model)] == ["decoder.0", "decoder.1"]


@pytest.mark.parametrize("name", ["lora", "ia3", "adapter"])
def test_phi3_takes_every_method_that_needs_targets(name):
    from deftune.methods import MethodConfig, apply_method

    torch.manual_seed(0)
    model = T.Phi3ForCausalLM(T.Phi3Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                           num_key_value_heads=2, intermediate_size=37, pad_token_id=0, **SMALL))
    adapted = apply_method(model, MethodConfig(name))
    assert any(p.requires_grad for p in adapted.parameters())
    adapted(input_ids=torch.randint(1, 100, (1, 4)))
