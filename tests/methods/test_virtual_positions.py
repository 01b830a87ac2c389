"""Prompt / P-tuning with per-token heads (methods/virtual_positions.py).

The reference runs the task model by hand the way peft feeds it — the virtual tokens' embeddings
before the real ones, the mask extended — and reads the real tokens' outputs; targets are placed
on the real tokens.
"""

from __future__ import annotations

from copy import deepcopy

import pytest
import torch
from methods_tiny import VOCAB
from peft import PromptTuningConfig, get_peft_model
from torch import nn
from transformers import BertConfig, BertForQuestionAnswering, BertForTokenClassification

from deftune.methods import MethodConfig, apply_method, load_adapter, save_adapter

N = 3
B, T, LABELS = 2, 7, 3


def tiny(task: str) -> nn.Module:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128,
                        num_labels=2 if task == "qa" else LABELS)
    cls = BertForQuestionAnswering if task == "qa" else BertForTokenClassification
    return cls(config).eval()


def _config(method: str) -> MethodConfig:
    extra = {"encoder_hidden_size": 16} if method == "ptuning" else {}
    return MethodConfig(name=method, num_virtual_tokens=N, **extra)


def _inputs(task: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 5:] = 0
    if task == "qa":
        return {"input_ids": ids, "attention_mask": mask, "start_positions": torch.tensor([1, 2]),
                "end_positions": torch.tensor([3, 4])}
    labels = torch.randint(0, LABELS, (B, T), generator=g).masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _built(task: str, method: str) -> nn.Module:
    model = apply_method(tiny(task), _config(method)).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a prompt and head that matter
        for name, p in model.named_parameters():
            if "prompt_encoder" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def _by_hand(model: nn.Module, inputs: dict[str, torch.Tensor], **targets: torch.Tensor):
    """The task model on [virtual tokens; real tokens], as peft calls it."""
    task_model = model.get_base_model()
    embeds = task_model.get_input_embeddings()(inputs["input_ids"])  # (B, T, H)
    prompt = model.get_prompt(batch_size=B).to(embeds.dtype)  # (B, N, H)
    mask = torch.cat([torch.ones(B, N, dtype=torch.long), inputs["attention_mask"]], dim=1)
    return task_model(inputs_embeds=torch.cat([prompt, embeds], dim=1), attention_mask=mask, **targets)


def _outputs(task: str, method: str, **ref_targets: torch.Tensor):
    """(inputs, deftune's output, the by-hand output with ``ref_targets``), without gradients."""
    model = _built(task, method)
    inputs = _inputs(task)
    with torch.no_grad():
        return inputs, model(**inputs), _by_hand(model, inputs, **ref_targets), model


@pytest.mark.parametrize("method", ["prompt", "ptuning"])
def test_token_labels_and_logits_stay_on_the_real_tokens(method):
    inputs, out, by_hand, _ = _outputs("token", method)
    ref = by_hand.logits[:, N:]  # (B, T, C)
    assert out.logits.shape == (B, T, LABELS)
    torch.testing.assert_close(out.logits, ref, rtol=0, atol=0)
    expected = nn.functional.cross_entropy(ref.reshape(-1, LABELS), inputs["labels"].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize("method", ["prompt", "ptuning"])
def test_answer_positions_index_the_real_tokens(method):
    shifted = {key: _inputs("qa")[key] + N for key in ("start_positions", "end_positions")}
    inputs, out, ref, model = _outputs("qa", method, **shifted)
    assert out.start_logits.shape == out.end_logits.shape == (B, T)
    torch.testing.assert_close(out.start_logits, ref.start_logits[:, N:], rtol=0, atol=0)
    torch.testing.assert_close(out.end_logits, ref.end_logits[:, N:], rtol=0, atol=0)
    torch.testing.assert_close(out.loss, ref.loss)
    # and not the loss of the unshifted positions (which point into the virtual tokens)
    with torch.no_grad():
        unshifted = _by_hand(model, inputs, start_positions=inputs["start_positions"],
                             end_positions=inputs["end_positions"]).loss
    assert (out.loss - unshifted).abs() > 1e-3


def test_peft_alone_still_misplaces_the_targets():
    """Why the hooks exist; if a peft release fixes this, the hooks must go (they would shift twice)."""
    peft_model = get_peft_model(tiny("token"), PromptTuningConfig(task_type="TOKEN_CLS", num_virtual_tokens=N))
    with pytest.raises(ValueError, match="batch_size"):
        peft_model(**_inputs("token"))
    qa = get_peft_model(tiny("qa"), PromptTuningConfig(task_type="QUESTION_ANS", num_virtual_tokens=N))
    assert qa(**_inputs("qa")).start_logits.shape == (B, N + T)


@pytest.mark.parametrize("trainable", [False, True])
@pytest.mark.parametrize("task", ["token", "qa"])
def test_a_loaded_model_is_aligned_too(tmp_path, task, trainable):
    model = _built(task, "ptuning")
    inputs = _inputs(task)
    key = "logits" if task == "token" else "start_logits"
    with torch.no_grad():
        expected = model(**inputs)
    save_adapter(model, tmp_path)
    loaded = load_adapter(tiny(task), tmp_path, trainable=trainable).eval()
    with torch.no_grad():
        got = loaded(**inputs)
    torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)
    torch.testing.assert_close(got.loss, expected.loss, rtol=0, atol=0)


def test_a_deep_copy_is_aligned_and_trains():
    model = _built("token", "prompt")
    copy = deepcopy(model).train()
    out = copy(**_inputs("token"))
    assert out.logits.shape == (B, T, LABELS)
    out.loss.backward()
    assert copy.prompt_encoder["default"].embedding.weight.grad.abs().sum() > 0


def test_tuple_outputs_are_refused_clearly():
    model = _built("token", "prompt")
    with pytest.raises(ValueError, match="return_dict=True"):
        model(**_inputs("token"), return_dict=False)
    model.get_base_model().config.return_dict = False
    with pytest.raises(ValueError, match="return_dict=True"):
        model(**_inputs("token"))


def test_positional_arguments_and_token_type_ids_are_found():
    model = _built("token", "prompt")
    inputs = _inputs("token")
    segments = (torch.arange(T) >= 4).long().expand(B, T)  # (B, T)
    with torch.no_grad():
        by_position = model(inputs["input_ids"], inputs["attention_mask"], None, inputs["labels"])
        with_segments = model(**inputs, token_type_ids=segments)
        ref = _by_hand(model, inputs, token_type_ids=torch.cat([torch.zeros(B, N, dtype=torch.long), segments], 1))
    torch.testing.assert_close(by_position.logits, model(**inputs).logits, rtol=0, atol=0)
    torch.testing.assert_close(by_position.loss, model(**inputs).loss, rtol=0, atol=0)
    torch.testing.assert_close(with_segments.logits, ref.logits[:, N:], rtol=0, atol=0)
    assert (with_segments.logits - by_position.logits).abs().max() > 1e-4  # the segments reached the model


def test_the_active_adapter_sets_the_shift():
    from peft import PromptTuningConfig

    model = _built("token", "prompt")
    model.add_adapter("five", PromptTuningConfig(task_type="TOKEN_CLS", num_virtual_tokens=5))
    model.set_adapter("five")
    inputs = _inputs("token")
    with torch.no_grad():
        out = model(**inputs)
        embeds = model.get_base_model().get_input_embeddings()(inputs["input_ids"])
        prompt = model.get_prompt(batch_size=B)
        mask = torch.cat([torch.ones(B, 5, dtype=torch.long), inputs["attention_mask"]], dim=1)
        ref = model.get_base_model()(inputs_embeds=torch.cat([prompt, embeds], 1), attention_mask=mask).logits
    assert out.logits.shape == (B, T, LABELS)
    torch.testing.assert_close(out.logits, ref[:, 5:], rtol=0, atol=0)


def test_answer_positions_out_of_range_behave_as_in_transformers():
    """At or past the end: ignored; below 0: the first real token (transformers clamps at 0)."""
    model = _built("qa", "prompt")
    inputs = _inputs("qa")
    past_end = torch.tensor([T, int(inputs["start_positions"][1])])  # row 0's start ignored
    with torch.no_grad():
        got = model(**{**inputs, "start_positions": past_end}).loss
        ref = _by_hand(model, inputs, start_positions=torch.tensor([N + T, past_end[1] + N]),  # N + T: ignored
                       end_positions=inputs["end_positions"] + N).loss
        below = model(**{**inputs, "start_positions": torch.tensor([-1, -5])}).loss
        at_zero = model(**{**inputs, "start_positions": torch.tensor([0, 0])}).loss
    torch.testing.assert_close(got, ref)
    with torch.no_grad():  # and row 0 really was left out
        assert (got - model(**{**inputs, "start_positions": torch.tensor([T - 1, past_end[1]])}).loss).abs() > 1e-4
    torch.testing.assert_close(below, at_zero, rtol=0, atol=0)


@pytest.mark.parametrize(("task", "name", "hooked"),
                         [("token", "prompt", True), ("token", "prefix", False), ("token", "lora", False),
                          ("qa", "ptuning", True), ("qa", "bitfit", False)])
def test_hooks_only_where_positions_are_added(monkeypatch, task, name, hooked):
    import peft

    monkeypatch.setattr(peft, "__version__", "0.21.2")
    cfg = _config(name) if name in ("prompt", "ptuning", "prefix") else MethodConfig(name=name)
    model = apply_method(tiny(task), cfg)
    assert (getattr(model, "_deftune_virtual_position_hooks", None) is not None) is hooked
    inputs = _inputs(task)
    out = model(**inputs)
    assert (out.logits if task == "token" else out.start_logits).shape[1] == T
    if hooked:
        from deftune.methods.virtual_positions import align_virtual_positions

        hooks = (dict(model._forward_pre_hooks), dict(model._forward_hooks))
        align_virtual_positions(model)  # idempotent
        assert (dict(model._forward_pre_hooks), dict(model._forward_hooks)) == hooks


def test_hooks_left_to_a_later_peft(monkeypatch):
    import peft

    monkeypatch.setattr(peft, "__version__", "0.22.0")
    model = apply_method(tiny("token"), _config("prompt"))
    assert getattr(model, "_deftune_virtual_position_hooks", None) is None
