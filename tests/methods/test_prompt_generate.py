"""``generate()`` of prompt-learning models (methods/prompt_generate.py).

The reference is greedy decoding through forward passes, which re-runs the whole sequence at
every step and so needs no generation cache: ``generate()`` must give the same tokens. Without the
mend, peft 0.21 on transformers >= 5.24 fails every causal-LM comparison of tokens here and
seq2seq prefix tuning (the tokens are the base model's, or drift from the prompt's); seq2seq
prompt and P-tuning never read the cache and guard against regressions only.
"""

from __future__ import annotations

import inspect
import io
import json
import warnings
from copy import deepcopy
from pathlib import Path

import pytest
import torch
from methods_tiny import VOCAB, tiny_llama
from torch import nn
from transformers import T5Config, T5ForConditionalGeneration

from deftune.methods import MethodConfig, apply_method, load_adapter, save_adapter
from deftune.methods.peft_compat import peft_needs_mends
from deftune.methods.prompt_generate import (
    CacheUnderOldName,
    PrepareWithOldCacheName,
    mend_generate,
)

N = 4
NEW = 6
METHODS = ("prefix", "prompt", "ptuning")
GOLDEN = Path(__file__).with_name("prompt_generate_golden.json")
# peft drops generate()'s position_ids for prompt / P-tuning (the virtual tokens shift them), and says so
pytestmark = pytest.mark.filterwarnings("ignore:Position ids are not supported:UserWarning")


def tiny_t5() -> T5ForConditionalGeneration:
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=VOCAB, d_model=32, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=8,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )
    model = T5ForConditionalGeneration(config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # T5's own init gives one repeated token at this size: varied weights instead
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


BUILD = {"llama": tiny_llama, "t5": tiny_t5}


def _config(method: str) -> MethodConfig:
    extra = {"encoder_hidden_size": 16} if method == "ptuning" else {}
    return MethodConfig(name=method, num_virtual_tokens=N, **extra)


def _randomise(model: nn.Module, seed: int = 3) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "prompt_encoder" in name:
                p.copy_(2.0 * torch.randn(p.shape, generator=g))
    return model


def _built(arch: str, method: str) -> nn.Module:
    return _randomise(apply_method(BUILD[arch](), _config(method))).eval()


def _mended(model: nn.Module) -> bool:
    """Whether deftune's stand-in runs peft's ``prepare_inputs_for_generation`` (peft < 0.22 only)."""
    return isinstance(model.__dict__.get("prepare_inputs_for_generation"), PrepareWithOldCacheName)


def _prompt() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([[3, 7, 9, 11, 13], [21, 2, 5, 6, 40]])  # (B, T)
    return ids, torch.ones_like(ids)


def _generate(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    """The new tokens only (a causal LM returns the prompt too; seq2seq the decoder start)."""
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW,
                             do_sample=False)
    return out[:, -NEW:].tolist()


def _greedy_by_forward(model: nn.Module, ids: torch.Tensor, seq2seq: bool) -> list[list[int]]:
    """Greedy decoding, the whole sequence re-run at each step (no cache)."""
    with torch.no_grad():
        if seq2seq:
            dec = torch.zeros(ids.shape[0], 1, dtype=torch.long)  # decoder_start_token_id
            for _ in range(NEW):
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=dec).logits
                dec = torch.cat([dec, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            return dec[:, 1:].tolist()
        seq = ids
        for _ in range(NEW):
            logits = model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        return seq[:, -NEW:].tolist()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_generate_follows_the_prompt(arch, method):
    model = _built(arch, method)
    ids, mask = _prompt()
    tokens = _generate(model, ids, mask)
    assert tokens == _greedy_by_forward(model, ids, seq2seq=arch == "t5")
    # (not ``disable_adapter()``: peft 0.21's seq2seq generate() keeps the prompt under it)
    assert _generate(BUILD[arch](), ids, mask) != tokens, "the prompt must change the tokens for this test to bite"


@pytest.mark.parametrize("method", METHODS)
def test_left_padded_generate_matches_peft_on_transformers_5_23(method):
    """Tokens recorded from peft's own ``generate()`` on transformers 5.23 (which it still reads right)."""
    model = _built("llama", method)
    ids = torch.tensor([[3, 7, 9, 11, 13], [0, 0, 5, 6, 40]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    assert _generate(model, ids, mask) == json.loads(GOLDEN.read_text())[f"llama-{method}-left-padded"]


@pytest.mark.parametrize("trainable", [False, True])
@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_a_loaded_prefix_generates_as_the_saved_one(tmp_path, arch, trainable):
    model = _built(arch, "prefix")
    ids, mask = _prompt()
    expected = _greedy_by_forward(model, ids, seq2seq=arch == "t5")
    save_adapter(model, tmp_path)
    loaded = load_adapter(BUILD[arch](), tmp_path, trainable=trainable).eval()
    assert _mended(loaded) is peft_needs_mends()
    assert _generate(loaded, ids, mask) == expected


def test_a_deep_copy_generates_with_its_own_prompt():
    model = _built("llama", "prefix")
    ids, mask = _prompt()
    before = _generate(model, ids, mask)
    copy = _randomise(deepcopy(model), seed=11)
    if _mended(copy):
        assert copy.prepare_inputs_for_generation.peft_model is copy
    assert _generate(copy, ids, mask) == _greedy_by_forward(copy, ids, seq2seq=False) != before
    assert _generate(model, ids, mask) == before


def test_a_pickled_model_generates_with_its_prompt():
    model = _built("llama", "prompt")
    ids, mask = _prompt()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    again = torch.load(buffer, weights_only=False)
    if _mended(again):
        assert again.prepare_inputs_for_generation.peft_model is again
    assert _generate(again, ids, mask) == _greedy_by_forward(model, ids, seq2seq=False)


@pytest.mark.parametrize("method", METHODS)
def test_generate_leaves_the_base_model_as_it_was(method):
    """peft hands the base model's ``prepare_inputs_for_generation`` over and back during
    ``generate()``; afterwards the bare base model generates as a fresh one, from ids or
    embeddings (transformers reads that method's signature), and without a deprecation warning."""
    ids, mask = _prompt()
    fresh = tiny_llama()
    embeds = fresh.get_input_embeddings()(ids).detach()
    by_embeds = fresh.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    model = _built("llama", method)
    _generate(model, ids, mask)
    base = model.get_base_model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _generate(base, ids, mask) == _generate(fresh, ids, mask)
    assert not [w for w in caught if "past_key_values" in str(w.message)]
    got = base.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    assert got.tolist() == by_embeds.tolist()


def test_mend_applies_to_prompt_learning_once_and_on_old_peft_only(monkeypatch):
    import peft

    monkeypatch.setattr(peft, "__version__", "0.21.2")
    model = _built("llama", "prefix")
    wrapper = model.prepare_inputs_for_generation
    assert _mended(model) and mend_generate(model).prepare_inputs_for_generation is wrapper  # idempotent
    peft_method = type(model).prepare_inputs_for_generation.__get__(model)
    assert inspect.signature(wrapper) == inspect.signature(peft_method)
    lora = apply_method(tiny_llama(), MethodConfig(name="lora", target_modules=("q_proj", "v_proj")))
    assert not _mended(lora)
    monkeypatch.setattr(peft, "__version__", "0.22.0")
    assert not _mended(apply_method(tiny_llama(), _config("prefix")))


def test_the_rename_is_scoped_to_peft_own_call(monkeypatch):
    import peft

    monkeypatch.setattr(peft, "__version__", "0.21.2")
    model = _built("llama", "prefix")
    base_prepare = model.base_model_prepare_inputs_for_generation
    seen = []

    def peft_prepare(self, *args, **kwargs):  # stands in for peft's method: what does it call?
        seen.append(self.base_model_prepare_inputs_for_generation)
        raise RuntimeError("stop")

    monkeypatch.setattr(type(model), "prepare_inputs_for_generation", peft_prepare)
    with pytest.raises(RuntimeError, match="stop"):
        model.prepare_inputs_for_generation(torch.zeros(1, 1, dtype=torch.long))
    assert isinstance(seen[0], CacheUnderOldName) and seen[0].prepare == base_prepare
    assert model.base_model_prepare_inputs_for_generation == base_prepare  # put back after an error too


def test_the_wrapper_renames_only_a_lone_cache():
    assert CacheUnderOldName(lambda **k: {"cache": 1, "input_ids": 2})() == {"past_key_values": 1, "input_ids": 2}
    both = {"cache": 1, "past_key_values": 3}
    assert CacheUnderOldName(lambda: dict(both))() == both
    assert CacheUnderOldName(lambda x: {"past_key_values": x})(5) == {"past_key_values": 5}

    def prepare(input_ids, cache=None, inputs_embeds=None, **kwargs):
        return {}

    assert inspect.signature(CacheUnderOldName(prepare)) == inspect.signature(prepare)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_smollm2_generates_with_its_prompt(method):
    """The packaged SmolLM2-135M (real weights; converted from its GGUF once, then cached)."""
    from deftune import models
    from deftune.generative.models import load_generative

    try:
        base, tokenizer = load_generative("smollm2")
    except models.ModelNotFoundError as err:  # CI installs the package; a bare GPU box may not have it
        pytest.skip(str(err))
    plain = {}
    prompts = ["The capital of France is", "def fibonacci(n):"]
    for text in prompts:
        ids = tokenizer(text, return_tensors="pt").input_ids
        plain[text] = _generate(base, ids, torch.ones_like(ids))
    model = apply_method(base, MethodConfig(name=method, num_virtual_tokens=8)).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # move the prompt away from its start by half its own spread
        for name, p in model.named_parameters():
            if "prompt_encoder" in name:
                p.add_(0.5 * p.std().clamp_min(0.02) * torch.randn(p.shape, generator=g))
    changed = 0
    for text in prompts:
        ids = tokenizer(text, return_tensors="pt").input_ids
        tokens = _generate(model, ids, torch.ones_like(ids))
        assert tokens == _greedy_by_forward(model, ids, seq2seq=False), text
        changed += tokens != plain[text]
    assert changed, "the prompt must change some tokens for this test to bite"
