"""MethodConfig validation and serialisation."""

from __future__ import annotations

import pytest

from deftune.methods import METHODS, MethodConfig

EXPECTED = {"lora", "dora", "ia3", "prefix", "prompt", "ptuning", "adapter", "bitfit", "full"}


def test_registry_has_every_method():
    assert set(METHODS) == EXPECTED


def test_unknown_name_lists_the_methods():
    with pytest.raises(ValueError, match="unknown method 'lorra'") as info:
        MethodConfig(name="lorra")
    for name in EXPECTED:
        assert repr(name) in str(info.value)


def test_deft_defaults():
    cfg = MethodConfig(name="lora")
    assert (cfg.r, cfg.lora_alpha, cfg.target_modules) == (8, 16, None)
    assert MethodConfig(name="prompt").num_virtual_tokens == 60
    adapter = MethodConfig(name="adapter")
    assert (adapter.adapter_kind, adapter.reduction_factor) == ("pfeiffer", 16)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"name": "lora", "reduction_factor": 8}, "reduction_factor=8 does not apply to method 'lora'"),
        ({"name": "full", "modules_to_save": ("pooler",)}, "does not apply to method 'full'"),
        ({"name": "prompt", "r": 4}, r"r=4 does not apply .* lora, dora"),
        ({"name": "lora", "r": 0}, "r must be an integer >= 1"),
        ({"name": "lora", "lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\)"),
        (
            {"name": "adapter", "adapter_kind": "lora"},
            r"adapter_kind must be one of \('pfeiffer', 'houlsby'\)",
        ),
        ({"name": "adapter", "adapter_activation": "swish"}, "adapter_activation must be one of"),
        ({"name": "adapter", "adapter_placement": "inside"}, "adapter_placement must be one of"),
        ({"name": "lora", "task_type": "CLS"}, "task_type must be one of"),
        ({"name": "lora", "target_modules": "query"}, "sequence of module names"),
        ({"name": "adapter", "adapter_scaling": float("inf")}, "adapter_scaling must be finite"),
        ({"name": "ptuning", "encoder_hidden_size": 0}, "encoder_hidden_size must be >= 1 or None"),
    ],
)
def test_invalid_values_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MethodConfig(**kwargs)


def test_round_trip_through_dict():
    cfg = MethodConfig(name="ia3", target_modules=["key", "value"], feedforward_modules=["value"])
    assert cfg.target_modules == ("key", "value")  # lists (JSON) become tuples
    assert MethodConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"unknown MethodConfig keys \['rank'\]"):
        MethodConfig.from_dict({"name": "lora", "rank": 4})


def test_prompt_init_is_validated_and_applies_to_prompt_tuning_only():
    with pytest.raises(ValueError, match=r"prompt_init must be one of \('random', 'vocab'\), got 'text'"):
        MethodConfig(name="prompt", prompt_init="text")
    with pytest.raises(ValueError, match="prompt_init='vocab' does not apply to method 'prefix'"):
        MethodConfig(name="prefix", prompt_init="vocab")


def test_vocab_start_copies_vocabulary_embeddings_and_random_does_not():
    import torch
    from methods_tiny import tiny_bert

    from deftune.methods import apply_method

    def virtual_tokens(init: str) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        model = apply_method(tiny_bert(), MethodConfig(name="prompt", num_virtual_tokens=5, prompt_init=init))
        return model.prompt_encoder["default"].embedding.weight.detach(), model.get_input_embeddings().weight.detach()

    prompts, vocab = virtual_tokens("vocab")  # (5, hidden), (vocab, hidden)
    is_vocab_row = (prompts[:, None] == vocab[None]).all(-1).any(-1)  # (5,)
    assert prompts.shape[0] == 5 and bool(is_vocab_row.all())
    assert torch.equal(prompts, virtual_tokens("vocab")[0])  # seeded: the same draw
    torch.manual_seed(0)
    saved = apply_method(tiny_bert(), MethodConfig(name="prompt", num_virtual_tokens=5, prompt_init="vocab"))
    assert saved.peft_config["default"].prompt_tuning_init == "SAMPLE_VOCAB"  # recorded in adapter_config.json
    random_prompts, vocab = virtual_tokens("random")
    assert not (random_prompts[:, None] == vocab[None]).all(-1).any()
