"""``token_type_ids`` / ``position_ids`` through peft's extractive-QA model (methods/qa_inputs.py)."""

from __future__ import annotations

from copy import deepcopy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from test_virtual_positions import B, N, T, _by_hand, _config, _inputs, tiny

from deftune.methods import MethodConfig, apply_method, load_adapter, save_adapter
from deftune.methods.qa_inputs import QAInputs

SEGMENTS = (torch.arange(T) >= 4).long().expand(B, T)  # question | context
PEFT_METHODS = ("lora", "dora", "ia3", "prompt", "ptuning")


def _built(name: str) -> torch.nn.Module:
    cfg = _config(name) if name in ("prompt", "ptuning") else MethodConfig(name=name)
    model = apply_method(tiny("qa"), cfg).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # an adapter, prompt and head that matter
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn(p.shape, generator=g))
    return model


def _reference(model: torch.nn.Module, inputs: dict, **extra: torch.Tensor):
    """The task model inside, called directly with the extra inputs (virtual tokens as segment 0)."""
    if model.active_peft_config.is_prompt_learning:
        padded = {k: torch.cat([torch.zeros(B, N, dtype=torch.long), v], 1) for k, v in extra.items()}
        out = _by_hand(model, inputs, **padded)
        return out.start_logits[:, N:], out.end_logits[:, N:]
    out = model.get_base_model()(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], **extra)
    return out.start_logits, out.end_logits


def _hook_object(model: torch.nn.Module) -> QAInputs:
    (hooks,) = {h.__self__ for h in model._forward_pre_hooks.values() if isinstance(getattr(h, "__self__", None), QAInputs)}
    return hooks


@pytest.mark.parametrize("name", PEFT_METHODS)
def test_token_type_ids_reach_the_task_model(name):
    model = _built(name)
    inputs = _inputs("qa")
    with torch.no_grad():
        got = model(**inputs, token_type_ids=SEGMENTS)
        without = model(**inputs)
        start, end = _reference(model, inputs, token_type_ids=SEGMENTS)
    torch.testing.assert_close(got.start_logits, start, rtol=0, atol=0)
    torch.testing.assert_close(got.end_logits, end, rtol=0, atol=0)
    assert (got.start_logits - without.start_logits).abs().max() > 1e-4


def test_position_ids_reach_an_adapter_model_and_are_ignored_with_a_prompt():
    inputs = _inputs("qa")
    shifted = (torch.arange(T) + 5).expand(B, T)
    lora = _built("lora")
    with torch.no_grad():
        got = lora(**inputs, position_ids=shifted).start_logits
        start, _ = _reference(lora, inputs, position_ids=shifted)
        assert (got - lora(**inputs).start_logits).abs().max() > 1e-4
    torch.testing.assert_close(got, start, rtol=0, atol=0)
    prompt = _built("prompt")
    with torch.no_grad(), pytest.warns(UserWarning, match="Position ids are not supported"):
        ignored = prompt(**inputs, position_ids=shifted).start_logits
    torch.testing.assert_close(ignored, prompt(**inputs).start_logits, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["prompt", "lora"])
def test_nothing_is_left_over_after_a_failed_call(name):
    """A call that fails inside peft, before the task model runs, must not leave its segments
    for the next direct call of the task model."""
    model = _built(name)
    inputs = _inputs("qa")
    if name == "prompt":
        bad = {"attention_mask": torch.ones(B + 1, T, dtype=torch.long)}  # peft fails widening it
    else:
        bad = {"adapter_names": ["no-such-adapter"] * B}  # peft refuses it before the task model
    with pytest.raises((RuntimeError, ValueError)):
        model(**{**inputs, **bad}, token_type_ids=SEGMENTS)
    assert _hook_object(model).pending == {}
    task_model = model.get_base_model()
    with torch.no_grad():
        direct = task_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).start_logits
        plain = task_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                           token_type_ids=torch.zeros(B, T, dtype=torch.long)).start_logits
    torch.testing.assert_close(direct, plain, rtol=0, atol=0)


def test_peft_alone_still_drops_them():
    """Why the hooks exist; if a peft release passes them on, this fails and the hooks can go."""
    peft_model = get_peft_model(tiny("qa"), LoraConfig(task_type="QUESTION_ANS", target_modules=["query", "value"]))
    inputs = _inputs("qa")
    with torch.no_grad():
        same = peft_model(**inputs, token_type_ids=SEGMENTS).start_logits
        torch.testing.assert_close(same, peft_model(**inputs).start_logits, rtol=0, atol=0)


@pytest.mark.parametrize("trainable", [False, True])
@pytest.mark.parametrize("name", PEFT_METHODS)
def test_loaded_and_copied_models_carry_them(tmp_path, name, trainable):
    model = _built(name)
    inputs = _inputs("qa")
    with torch.no_grad():
        expected = model(**inputs, token_type_ids=SEGMENTS).start_logits
    save_adapter(model, tmp_path)
    loaded = load_adapter(tiny("qa"), tmp_path, trainable=trainable).eval()
    copy = deepcopy(model)
    assert _hook_object(copy) is not _hook_object(model)  # its own stash
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs, token_type_ids=SEGMENTS).start_logits, expected, rtol=0, atol=0)
        torch.testing.assert_close(copy(**inputs, token_type_ids=SEGMENTS).start_logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize(("task", "name", "version", "hooked"),
                         [("qa", "lora", "0.21.2", True), ("qa", "lora", "0.22.0", False),
                          ("token", "lora", "0.21.2", False), ("qa", "bitfit", "0.21.2", False)])
def test_hooks_only_on_peft_qa_models(monkeypatch, task, name, version, hooked):
    import peft

    from deftune.methods.qa_inputs import carry_qa_inputs

    monkeypatch.setattr(peft, "__version__", version)
    model = apply_method(tiny(task), MethodConfig(name=name))
    assert (getattr(model, "_deftune_qa_input_hooks", None) is not None) is hooked
    if hooked:
        handles = model._deftune_qa_input_hooks
        assert carry_qa_inputs(model)._deftune_qa_input_hooks is handles  # idempotent
