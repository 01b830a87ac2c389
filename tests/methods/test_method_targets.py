"""Per-architecture targets, task types and the verbs' error paths."""

from __future__ import annotations

import pytest
import torch
from methods_tiny import tiny_batch, tiny_bert, tiny_llama
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    OPTConfig,
    OPTForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from deftune.methods import (
    MergeNotSupportedError,
    MethodConfig,
    apply_method,
    load_adapter,
    merge_adapter,
    method_config,
    save_adapter,
    virtual_token_count,
)
from deftune.methods.bottleneck import adapter_layers
from deftune.methods.targets import infer_task_type


def tiny_gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64))


def tiny_opt():
    return OPTForCausalLM(
        OPTConfig(
            vocab_size=100,
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=64,
            word_embed_proj_dim=32,
        )
    )


def tiny_t5():
    return T5ForConditionalGeneration(
        T5Config(
            vocab_size=100, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, decoder_start_token_id=0
        )
    )


# (builder, task type, LoRA-wrapped module suffixes, Houlsby adapter count = attention outputs + MLPs)
FAMILIES = {
    "bert": (tiny_bert, "SEQ_CLS", {"query", "value"}, 2 + 2),
    "llama": (tiny_llama, "CAUSAL_LM", {"q_proj", "v_proj"}, 2 + 2),
    "gpt2": (tiny_gpt2, "CAUSAL_LM", {"c_attn"}, 2 + 2),
    "opt": (tiny_opt, "CAUSAL_LM", {"q_proj", "v_proj"}, 2 + 2),
    "t5": (tiny_t5, "SEQ_2_SEQ_LM", {"q", "v"}, 2 + 2 + 2 * 2 + 2),  # decoder: self + cross attention
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_lora_targets_per_family(family):
    build, task, suffixes, _ = FAMILIES[family]
    model = apply_method(build(), "lora")
    cfg = method_config(model)
    assert cfg.task_type == task
    wrapped = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == suffixes


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_houlsby_adapters_per_family(family):
    build, _, _, count = FAMILIES[family]
    model = apply_method(build(), MethodConfig(name="adapter", adapter_kind="houlsby"))
    assert len(adapter_layers(model)) == count
    assert len(method_config(model).target_modules) == count  # resolved paths are saved


def test_pfeiffer_wraps_the_mlp_down_projections_only():
    model = apply_method(tiny_bert(), "adapter")
    assert sorted(adapter_layers(model)) == [
        "bert.encoder.layer.0.output.dense",
        "bert.encoder.layer.1.output.dense",
    ]


def test_ia3_scales_the_activation_feeding_the_down_projection():
    model = apply_method(tiny_llama(), "ia3")
    cfg = method_config(model)
    assert cfg.feedforward_modules == ("model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj")
    assert set(cfg.target_modules) >= {"k_proj", "v_proj"}


def test_ia3_with_short_target_names_still_scales_the_mlp_input(tmp_path):
    """Named targets ("output.dense") must not turn the MLP down projection into an output scaling:
    its IA3 vector has the intermediate width (1, I); the attention output's keeps (H, 1)."""
    model = apply_method(tiny_bert(), MethodConfig(name="ia3", target_modules=("key", "value", "output.dense")))
    cfg = method_config(model)
    assert cfg.feedforward_modules == ("bert.encoder.layer.0.output.dense", "bert.encoder.layer.1.output.dense")
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if "ia3_l" in n and "layer.0." in n}
    assert shapes["base_model.model.bert.encoder.layer.0.output.dense.ia3_l.default"] == (1, 64)
    assert shapes["base_model.model.bert.encoder.layer.0.attention.output.dense.ia3_l.default"] == (32, 1)


def test_target_override_and_unmatched_name():
    model = apply_method(tiny_bert(), MethodConfig(name="lora", target_modules=("key",)))
    assert {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")} == {"key"}
    with pytest.raises(ValueError, match=r"no module of BertForSequenceClassification matches \['nope'\]"):
        apply_method(tiny_bert(), MethodConfig(name="adapter", target_modules=("nope",)))


def test_task_type_inference():
    assert infer_task_type(tiny_bert()) == "SEQ_CLS"
    assert infer_task_type(tiny_t5()) == "SEQ_2_SEQ_LM"
    assert infer_task_type(tiny_gpt2()) == "CAUSAL_LM"
    assert infer_task_type(tiny_bert().bert) == "FEATURE_EXTRACTION"


def test_bitfit_rejects_models_without_biases():
    with pytest.raises(ValueError, match="no bias parameters"):
        apply_method(tiny_llama(), "bitfit")


def test_verbs_reject_plain_and_already_adapted_models(tmp_path):
    with pytest.raises(ValueError, match="carries no deftune method"):
        save_adapter(tiny_bert(), tmp_path)
    assert virtual_token_count(tiny_bert()) == 0
    base = tiny_bert()
    model = apply_method(base, "lora")
    with pytest.raises(ValueError, match="already carries method 'lora'"):
        apply_method(model, "adapter")
    with pytest.raises(ValueError, match="already carries adapter layers"):
        apply_method(base, "lora")  # the base object itself was changed in place


def test_merge_error_names_the_method_and_the_alternatives():
    model = apply_method(tiny_bert(), MethodConfig(name="prompt", num_virtual_tokens=2))
    with pytest.raises(
        MergeNotSupportedError, match=r"cannot merge method 'prompt'.*Methods that merge: \['adapter'"
    ):
        merge_adapter(model)


def test_full_fine_tuning_trains_everything_and_round_trips(tmp_path):
    model = apply_method(tiny_bert(), "full")
    assert all(p.requires_grad for p in model.parameters())
    save_adapter(model, tmp_path)
    assert (tmp_path / "config.json").is_file() and list(tmp_path.glob("model*.safetensors"))


def test_verbs_see_through_a_wrapper():
    model = apply_method(tiny_bert(), MethodConfig(name="prompt", num_virtual_tokens=2))

    class Wrapper(torch.nn.Module):  # like DDP / accelerate: the real model under .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert virtual_token_count(Wrapper(model)) == 2
    assert method_config(Wrapper(model)).name == "prompt"
    assert tiny_batch("bert")["input_ids"].shape == (2, 7)


@torch.no_grad()
def _perturb(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(3)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(0.2 * torch.randn(p.shape, generator=g))


@torch.no_grad()
def _out(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


def test_save_load_keeps_a_non_default_adapter_scaling(tmp_path):
    model = apply_method(tiny_bert(), MethodConfig("adapter", adapter_scaling=2.0, adapter_activation="identity"))
    _perturb(model)
    ids = tiny_batch("bert")["input_ids"]
    save_adapter(model, tmp_path)
    loaded = load_adapter(tiny_bert(), tmp_path)
    assert method_config(loaded).adapter_scaling == 2.0
    torch.testing.assert_close(_out(loaded, ids), _out(model.eval(), ids), rtol=0, atol=1e-6)


def test_a_save_of_another_format_version_is_refused(tmp_path):
    import json

    save_adapter(apply_method(tiny_bert(), "lora"), tmp_path)
    path = tmp_path / "deftune_method.json"
    saved = json.loads(path.read_text())
    saved["format_version"] = 99
    path.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="format_version 99"):
        load_adapter(tiny_bert(), tmp_path)


def test_a_method_is_not_applied_over_stray_activation_scales():
    from deftune.act_scale import add_act_scales

    model = tiny_bert()
    add_act_scales(model, "layer")
    with pytest.raises(ValueError, match=r"already carries adapter layers \(ScaledActivation\)"):
        apply_method(model, "lora")


def test_verbs_see_through_torch_compile():
    model = apply_method(tiny_bert(), MethodConfig(name="prompt", num_virtual_tokens=2))
    compiled = torch.compile(model)  # not run: the wrapper keeps the model under ._orig_mod
    assert method_config(compiled).name == "prompt" and virtual_token_count(compiled) == 2


def test_full_fine_tuning_of_a_tied_model_round_trips(tmp_path):
    """GPT-2 ties lm_head to the embeddings: the save holds the tensor once, the load restores both."""
    torch.manual_seed(0)
    model = apply_method(tiny_gpt2(), "full")
    _perturb(model)
    ids = torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(0))
    save_adapter(model, tmp_path)
    torch.manual_seed(1)
    loaded = load_adapter(tiny_gpt2(), tmp_path)
    assert not loaded.training  # frozen loads are in eval mode (dropout off), as peft's are
    torch.testing.assert_close(_out(loaded, ids), _out(model.eval(), ids), rtol=0, atol=1e-6)


def test_a_llama_classifier_trains_and_saves_its_score_head(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    def build():
        torch.manual_seed(0)
        return LlamaForSequenceClassification(LlamaConfig(
            vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, num_labels=3, pad_token_id=0)).eval()

    ids = torch.randint(1, 100, (2, 5), generator=torch.Generator().manual_seed(0))
    for name, head in [("lora", "score.modules_to_save.default.weight"),  # peft's copy
                       ("adapter", "score.weight")]:  # deftune's own method
        model = apply_method(build(), MethodConfig(name))
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert any(n.endswith(head) for n in trainable), (name, [n for n in trainable if "score" in n])
        _perturb(model)
        save_adapter(model, tmp_path / name)
        loaded = load_adapter(build(), tmp_path / name)
        torch.testing.assert_close(_out(loaded, ids), _out(model.eval(), ids), rtol=0, atol=1e-6)
