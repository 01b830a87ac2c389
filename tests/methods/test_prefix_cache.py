"""Prefix tuning with a task head, fed by deftune's backbone pre-hook (methods/prefix_cache.py).

The reference is peft's own path (``get_peft_model`` with ``task_type="SEQ_CLS"``), which runs
where transformers still names the cache ``past_key_values`` (< 5.24); there the two must give the
same outputs from the same parameters.
"""

from __future__ import annotations

import json
from copy import deepcopy

import pytest
import torch
from methods_tiny import VOCAB, tiny_batch, tiny_bert
from peft import PeftModel, PrefixTuningConfig, get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForSequenceClassification

from deftune.methods import FORMAT_VERSION, MethodConfig, apply_method, load_adapter, method_config
from deftune.methods.prefix_cache import cache_argument, feed_prefix

N = 3


def tiny_llama_cls() -> LlamaForSequenceClassification:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, num_labels=2, pad_token_id=0,
    )
    return LlamaForSequenceClassification(config).eval()


BUILD = {"bert": tiny_bert, "llama": tiny_llama_cls}


def _randomised(model: nn.Module) -> nn.Module:
    """Non-trivial prefix and head (both start random or zero-ish; make them matter)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "prompt_encoder" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def _native(kind: str) -> PeftModel:
    return _randomised(get_peft_model(BUILD[kind](), PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=N)))


def _fed(kind: str, state: dict) -> PeftModel:
    model = apply_method(BUILD[kind](), MethodConfig(name="prefix", num_virtual_tokens=N)).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and not [k for k in missing if "prompt_encoder" in k or "modules_to_save" in k]
    return model


def _inputs(kind: str, masked: bool) -> dict:
    batch = tiny_batch("bert")  # right padding in row 1; LLaMA's classifier reads the last real token
    if kind == "llama":
        batch["input_ids"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 0)
    inputs = {"input_ids": batch["input_ids"]}
    if masked:
        inputs["attention_mask"] = batch["attention_mask"]
    return inputs


def _seeded_logits(model: nn.Module, inputs: dict) -> torch.Tensor:
    torch.manual_seed(7)  # the same dropout draws in train mode
    return model(**inputs).logits


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("masked", [True, False], ids=["mask", "no-mask"])
@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_same_outputs_as_peft_path(kind, masked, training):
    native = _native(kind).train(training)
    inputs = _inputs(kind, masked)
    try:
        expected = _seeded_logits(native, inputs)
    except ValueError as err:
        if "past key values" not in str(err):
            raise
        pytest.skip("peft's own prefix path needs transformers < 5.24")
    fed = _fed(kind, native.state_dict()).train(training)
    got = _seeded_logits(fed, inputs)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    if training:  # and the same gradients reach the prefix
        grads = []
        for model, logits in ((native, expected), (fed, got)):
            model.zero_grad()
            logits.square().sum().backward()
            grads.append(model.prompt_encoder["default"].embedding.weight.grad)
        assert grads[0] is not None and grads[0].abs().sum() > 0
        torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-6)


def _filled(model: nn.Module) -> nn.Module:
    """Every parameter drawn from a seeded generator (independent of any library's initialisation)."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


# peft's own path on transformers 5.23 (peft 0.21.2) for _filled(SEQ_CLS prefix model), tiny_batch("bert"):
# the logits, and the sum and absolute sum of the prefix's gradient of sum(logits²). Recorded so that
# the versions where peft's path cannot run (>= 5.24) are checked against it too.
GOLDEN_LOGITS = [[-0.14104877412319183, -0.258608877658844], [-0.13983909785747528, -0.2757975459098816]]
GOLDEN_GRAD = (0.01833033561706543, 0.9145552515983582)


def test_logits_and_prefix_gradient_equal_peft_path_recorded_on_5_23():
    native = _filled(get_peft_model(tiny_bert(), PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=N)))
    fed = _fed("bert", native.state_dict())
    logits = fed(**_inputs("bert", masked=True)).logits
    torch.testing.assert_close(logits, torch.tensor(GOLDEN_LOGITS), rtol=0, atol=2e-6)
    logits.square().sum().backward()
    grad = fed.prompt_encoder["default"].embedding.weight.grad
    assert (float(grad.sum()), float(grad.abs().sum())) == pytest.approx(GOLDEN_GRAD, rel=1e-4)


def test_a_deep_copy_feeds_its_own_prefix():
    fed = _fed("bert", _native("bert").state_dict())
    copy = deepcopy(fed)
    inputs = _inputs("bert", masked=True)
    with torch.no_grad():
        copy.prompt_encoder["default"].embedding.weight.zero_()
        assert (copy(**inputs).logits - fed(**inputs).logits).abs().max() > 1e-3
    copy.prompt_encoder["default"].embedding.weight.requires_grad_(True)
    copy(**inputs).logits.sum().backward()
    assert copy.prompt_encoder["default"].embedding.weight.grad is not None
    assert fed.prompt_encoder["default"].embedding.weight.grad is None


def test_given_position_ids_are_offset_past_the_prefix():
    fed = _fed("bert", _native("bert").state_dict())
    inputs = _inputs("bert", masked=True)
    positions = torch.arange(inputs["input_ids"].shape[1]).expand_as(inputs["input_ids"])
    with torch.no_grad():  # transformers numbers the tokens after a cache from its length on, as here
        torch.testing.assert_close(fed(**inputs, position_ids=positions).logits, fed(**inputs).logits,
                                   rtol=0, atol=1e-6)


def test_arguments_are_found_by_name_whatever_their_position():
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(0)
    gpt2 = GPT2ForSequenceClassification(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                    pad_token_id=0)).eval()
    fed = apply_method(gpt2, MethodConfig(name="prefix", num_virtual_tokens=N)).eval()
    inputs = _inputs("llama", masked=True)
    backbone = fed.get_base_model().transformer  # forward(input_ids, cache / past_key_values, attention_mask, ...)
    with torch.no_grad():
        by_name = backbone(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
        by_position = backbone(inputs["input_ids"], None, inputs["attention_mask"]).last_hidden_state
    torch.testing.assert_close(by_position, by_name, rtol=0, atol=0)


def test_encoder_decoder_classifiers_are_refused_clearly():
    from transformers import T5Config, T5ForSequenceClassification

    t5 = T5ForSequenceClassification(T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                              num_heads=4, decoder_start_token_id=0, pad_token_id=0))
    with pytest.raises(ValueError, match="not supported for encoder-decoder models .*T5ForSequenceClassification"):
        apply_method(t5, MethodConfig(name="prefix", num_virtual_tokens=N))


def test_a_projected_prefix_reloads_trainable(tmp_path):
    from deftune.methods import save_adapter

    model = apply_method(tiny_bert(), MethodConfig(name="prefix", num_virtual_tokens=N, prefix_projection=True,
                                                   encoder_hidden_size=16))
    _randomised(model).eval()
    save_adapter(model, tmp_path)
    again = load_adapter(tiny_bert(), tmp_path, trainable=True).eval()
    inputs = _inputs("bert", masked=True)
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)
    assert any(p.requires_grad for n, p in again.named_parameters() if "prompt_encoder" in n)


def test_the_prefix_changes_the_output():
    fed = _fed("bert", _native("bert").state_dict())
    inputs = _inputs("bert", masked=True)
    with torch.no_grad():
        with_prefix = fed(**inputs).logits
        fed._deftune_prefix_hook.remove()
        without = fed(**inputs).logits
    assert (with_prefix - without).abs().max() > 1e-3


def test_positional_mask_is_extended_like_a_keyword_one():
    fed = _fed("bert", _native("bert").state_dict())
    inputs = _inputs("bert", masked=True)
    backbone = fed.get_base_model().bert
    with torch.no_grad():
        by_keyword = backbone(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        by_position = backbone(inputs["input_ids"], inputs["attention_mask"])
    torch.testing.assert_close(by_position.last_hidden_state, by_keyword.last_hidden_state, rtol=0, atol=0)
    # padding changes nothing in the real rows only if the extended mask still hides it
    ids = inputs["input_ids"].clone()
    ids[1, 4:] = (ids[1, 4:] + 1) % VOCAB
    with torch.no_grad():
        moved = backbone(input_ids=ids, attention_mask=inputs["attention_mask"]).last_hidden_state
    torch.testing.assert_close(moved[1, :4], by_keyword.last_hidden_state[1, :4], rtol=0, atol=1e-5)


def test_apply_builds_a_plain_peft_model_with_the_head_saved():
    model = apply_method(tiny_bert(), MethodConfig(name="prefix", num_virtual_tokens=N))
    assert type(model) is PeftModel
    config = model.active_peft_config
    assert config.task_type is None and config.modules_to_save == ["classifier"]
    assert method_config(model).task_type == "SEQ_CLS"  # deftune's own record keeps the task
    assert len(model.get_base_model().bert._forward_pre_hooks) == 1
    feed_prefix(model)  # idempotent
    assert len(model.get_base_model().bert._forward_pre_hooks) == 1


def test_a_run_saved_by_peft_own_path_loads(tmp_path):
    """Adapters saved with ``task_type="SEQ_CLS"`` (deftune before 5.24 support) still load."""
    native = _native("bert")
    native.save_pretrained(str(tmp_path))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    cfg = MethodConfig(name="prefix", num_virtual_tokens=N, task_type="SEQ_CLS")
    (tmp_path / "deftune_method.json").write_text(json.dumps({"format_version": FORMAT_VERSION,
                                                              "method": cfg.to_dict()}))
    loaded = load_adapter(tiny_bert(), tmp_path)
    assert type(loaded) is PeftModel and not any(p.requires_grad for p in loaded.parameters())
    expected = _fed("bert", native.state_dict())
    inputs = _inputs("bert", masked=True)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, expected(**inputs).logits, rtol=0, atol=0)


def test_refuses_a_cache_of_its_own_and_a_4d_mask():
    fed = _fed("bert", _native("bert").state_dict())
    inputs = _inputs("bert", masked=True)
    backbone = fed.get_base_model().bert
    with pytest.raises(ValueError, match="supplies the key/value cache itself"):
        backbone(input_ids=inputs["input_ids"], **{cache_argument(backbone): fed.get_prompt(2)})
    with pytest.raises(ValueError, match=r"2-D attention_mask .* got shape \(2, 1, 7, 7\)"):
        backbone(input_ids=inputs["input_ids"], attention_mask=torch.ones(2, 1, 7, 7))


def test_cache_argument_names_what_forward_takes():
    class Old(nn.Module):
        def forward(self, x, past_key_values=None):
            return x

    class New(nn.Module):
        def forward(self, x, cache=None, **kwargs):
            return x

    class Neither(nn.Module):
        def forward(self, x, **kwargs):
            return x

    assert cache_argument(Old()) == "past_key_values"
    assert cache_argument(New()) == "cache"
    with pytest.raises(TypeError, match="Neither.forward takes neither `cache` nor `past_key_values`"):
        cache_argument(Neither())
