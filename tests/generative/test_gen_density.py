"""Density on the teacher-forced pass and during KV-cache generation; per-stack losses; hooks."""

from __future__ import annotations

import pytest
import torch
from gen_helpers import encode_all

from deftune.density import ActivationRecorder
from deftune.generative.evaluate import generate_answers, greedy_generate, teacher_forced_density
from deftune.generative.format import prompt_batch, training_batch
from deftune.generative.models import load_generative
from deftune.losses import DensityLossConfig
from deftune.regularizer import DensityRegularizer


def hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_per_stack_density_encoder_decoder(examples):
    model, tok = load_generative("tiny-t5")
    items = encode_all(examples[:4], tok, seq2seq=True)
    result = teacher_forced_density(model, tok, items, batch_size=2)
    assert set(result.per_stack) == {"encoder", "decoder"}
    batch = training_batch(items, tok.pad_token_id, seq2seq=True)
    enc = [v for k, v in result.per_layer.items() if k.startswith("encoder")]
    dec = [v for k, v in result.per_layer.items() if k.startswith("decoder")]
    assert len(enc) == len(dec) == 2
    # real tokens only: encoder counts prompt tokens, decoder counts answer (+EOS) tokens
    assert all(v.tokens == int(batch["attention_mask"].sum()) for v in enc)
    assert all(v.tokens == int(batch["decoder_attention_mask"].sum()) for v in dec)
    assert 0.2 < result.per_stack["encoder"] < 0.8  # ReLU T5 with random weights: about half


def test_stack_weights_weight_each_stack(examples):
    model, tok = load_generative("tiny-t5")
    batch = training_batch(encode_all(examples[:2], tok, seq2seq=True), tok.pad_token_id, seq2seq=True)

    def loss(weights: dict) -> float:
        cfg = DensityLossConfig(loss="tanh", stack_weights=weights)
        with DensityRegularizer(model, cfg) as reg:
            model(**batch)
            return float(reg.density_loss().detach())

    enc, dec = loss({"encoder": 1.0, "decoder": 0.0}), loss({"encoder": 0.0, "decoder": 1.0})
    assert enc != pytest.approx(dec)
    assert loss({"encoder": 1.0, "decoder": 3.0}) == pytest.approx((enc + 3 * dec) / 4, rel=1e-5)


def _reference_counts(model, rows: list[list[int]]):
    """Uncached forward over each full sequence, one at a time (no padding)."""
    with ActivationRecorder(model) as rec, torch.no_grad():
        for r in rows:
            ids = torch.tensor([r])
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return rec.counts


def _eos_that_staggers(free: list[list[int]], n_new: int) -> int:
    """A token that, taken as EOS, ends some rows early (not at step 0) and others later or never."""
    for token in sorted({t for row in free for t in row}):
        stops = [row.index(token) if token in row else n_new for row in free]
        if min(stops) >= 1 and len(set(stops)) > 1:
            return token
    raise AssertionError(f"no staggering EOS candidate in {free}")


@pytest.mark.parametrize("name", ["tiny-llama-relu", "tiny-gpt2"])
def test_kv_cache_decoding_counts_each_real_token_once(examples, name):
    model, tok = load_generative(name)
    torch.manual_seed(1)
    with torch.no_grad():  # larger random weights: varied greedy tokens, not one repeated token
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
                module.weight.normal_(0.0, 0.3)
    items = encode_all(examples[:3], tok, seq2seq=False)
    batch = prompt_batch(items, tok.pad_token_id, seq2seq=False)
    n_new = 6
    free = greedy_generate(model, batch, eos_id=-1, pad_id=tok.pad_token_id, max_new_tokens=n_new)
    eos = _eos_that_staggers(free, n_new)  # rows finish at different steps
    with ActivationRecorder(model) as pre, ActivationRecorder(model) as dec:
        toks = greedy_generate(model, batch, eos_id=eos, pad_id=tok.pad_token_id, max_new_tokens=n_new,
                               prefill_recorder=pre, decode_recorder=dec)
    assert len({len(t) for t in toks}) > 1
    fed = [t if len(t) < n_new else t[:-1] for t in toks]  # the last token of a full row is never fed
    ref = _reference_counts(model, [it.prompt + f for it, f in zip(items, fed)])
    for name_ in ref:
        p, d, r = pre.counts[name_], dec.counts[name_], ref[name_]
        assert p.tokens == sum(len(it.prompt) for it in items)
        assert p.tokens + d.tokens == r.tokens  # padding and finished rows never counted
        assert abs(p.nonzero + d.nonzero - r.nonzero) <= 1e-3 * r.elements


def test_greedy_generate_gives_recorders_back_as_it_found_them(examples):
    model, tok = load_generative("tiny-llama-relu")
    batch = prompt_batch(encode_all(examples[:2], tok, seq2seq=False), tok.pad_token_id, seq2seq=False)
    with ActivationRecorder(model) as pre, ActivationRecorder(model) as dec:
        dec.enabled = False  # switched off by the caller: on for its phase inside, off again after
        greedy_generate(model, batch, eos_id=-1, pad_id=tok.pad_token_id, max_new_tokens=2,
                        prefill_recorder=pre, decode_recorder=dec)
        assert (pre.enabled, dec.enabled) == (True, False)


def test_hf_generate_steps_are_right_aligned():
    """With transformers' own generate (no EOS), each cached step counts one token per row."""
    model, tok = load_generative("tiny-llama-relu")
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])  # row 0 left-padded
    mask = (ids != 0).long()
    n_new = 4
    with ActivationRecorder(model) as rec:
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new,
                       do_sample=False, pad_token_id=0, eos_token_id=None)
    expected = int(mask.sum()) + 2 * (n_new - 1)
    assert all(c.tokens == expected for c in rec.counts.values())


def test_generation_leaves_no_hooks_behind(examples):
    model, tok = load_generative("tiny-t5")
    items = encode_all(examples[:3], tok, seq2seq=True)
    before = hook_count(model)
    answers, out = generate_answers(model, tok, items, max_new_tokens=3, batch_size=2)
    assert hook_count(model) == before
    assert set(answers) == {it.id for it in items}
    assert set(out.prefill.per_stack) == {"encoder"} and set(out.decode.per_stack) == {"decoder"}

    class Broken:  # a tokenizer whose decode fails mid-evaluation
        pad_token_id, eos_token_id = tok.pad_token_id, tok.eos_token_id

        def decode(self, *a, **k):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        generate_answers(model, Broken(), items, max_new_tokens=2, batch_size=2)
    assert hook_count(model) == before
