"""Evaluation of a generative QA model: greedy answers -> EM / F1, density, perplexity.

* **Teacher-forced density** (the paper's measurement): one forward pass over prompt + gold
  answer, counting exact non-zeros of every MLP activation over real tokens.
* **Generation density**: the same counts while the model decodes greedily with its KV cache.
  The prompt pass (prefill) and the one-token decoding steps are counted separately. Each
  decoding step's activation is ``(B, 1, F)`` and its attention mask ``(B, past + 1)``; the
  recorder right-aligns the mask, so the step counts exactly the new token of the sequences
  still running. A sequence that has emitted EOS gets a 0 appended to its mask for every later
  step, so its padding steps are not counted (``transformers.generate`` would append 1s).
* **Perplexity** of held-out plain text (a guard against damaging the language model).

:func:`greedy_generate` is a small decoder written for this: ``transformers``' ``generate``
gives no hook to tell which later steps are padding of finished sequences.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from deftune.data.squad import SquadExample, squad_scores
from deftune.density import ActivationRecorder, DensityResult, measure_density
from deftune.generative.format import Encoded, prompt_batch, training_batch
from deftune.progress import track


def is_seq2seq(model: nn.Module) -> bool:
    from deftune.arch import base_config

    return bool(getattr(base_config(model), "is_encoder_decoder", False))


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@dataclass
class GenerationOutput:
    """Greedy continuations (token ids without EOS) and, when recorders were given, their density."""

    tokens: list[list[int]]
    prefill: DensityResult | None = None
    decode: DensityResult | None = None


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    batch: dict[str, Tensor],
    *,
    eos_id: int,
    pad_id: int,
    max_new_tokens: int,
    prefill_recorder: ActivationRecorder | None = None,
    decode_recorder: ActivationRecorder | None = None,
) -> list[list[int]]:
    """Greedy decoding with the KV cache; returns each row's new tokens (EOS excluded).

    ``batch`` holds ``input_ids`` and ``attention_mask``, left-padded for causal LMs. Attached
    recorders are switched on for their phase only: ``prefill_recorder`` for the prompt pass (for
    seq2seq the encoder), ``decode_recorder`` for the single-token decoding steps (for seq2seq every
    decoder step, the first one included). Each recorder's ``enabled`` flag is restored on return.
    """
    device = _device(model)
    ids = batch["input_ids"].to(device)  # (B, T)
    mask = batch["attention_mask"].to(device)  # (B, T)
    seq2seq = is_seq2seq(model)
    bsz = ids.shape[0]

    def phase(prefill: bool, decode: bool) -> None:
        if prefill_recorder is not None:
            prefill_recorder.enabled = prefill
        if decode_recorder is not None:
            decode_recorder.enabled = decode

    was = (prefill_recorder.enabled if prefill_recorder is not None else True,
           decode_recorder.enabled if decode_recorder is not None else True)
    out_tokens: list[list[int]] = [[] for _ in range(bsz)]
    finished = torch.zeros(bsz, dtype=torch.bool, device=device)
    try:
        if seq2seq:
            from deftune.arch import base_config

            start = base_config(model).decoder_start_token_id
            dec_ids = torch.full((bsz, 1), start, dtype=torch.long, device=device)  # (B, 1)
            dec_mask = torch.ones_like(dec_ids)
            phase(True, True)  # encoder (prefill) and decoder step 0 (decode) in one call
            out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec_ids,
                        decoder_attention_mask=dec_mask, use_cache=True)
            encoder_outputs = (out.encoder_last_hidden_state,)
            phase(False, True)
        else:
            positions = (mask.cumsum(-1) - 1).clamp_min(0)  # (B, T): left padding shifts positions
            phase(True, False)
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
            phase(False, True)
            last_pos = positions[:, -1:]  # (B, 1)
        past = out.past_key_values
        for step in range(max_new_tokens):
            nxt = out.logits[:, -1].argmax(-1)  # (B,)
            done_now = finished | (nxt == eos_id)
            for i in (~done_now).nonzero().flatten().tolist():
                out_tokens[i].append(int(nxt[i]))
            finished = done_now
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            feed = torch.where(finished, torch.full_like(nxt, pad_id), nxt)[:, None]  # (B, 1)
            real = (~finished).long()[:, None]  # finished rows are padding from now on
            if seq2seq:
                dec_mask = torch.cat([dec_mask, real], dim=1)  # (B, t + 1)
                out = model(encoder_outputs=encoder_outputs, attention_mask=mask, decoder_input_ids=feed,
                            decoder_attention_mask=dec_mask, past_key_values=past, use_cache=True)
            else:
                mask = torch.cat([mask, real], dim=1)  # (B, T + t + 1)
                last_pos = last_pos + 1
                out = model(input_ids=feed, attention_mask=mask, position_ids=last_pos,
                            past_key_values=past, use_cache=True)
            past = out.past_key_values
    finally:
        phase(*was)
    return out_tokens


def generate_answers(
    model: nn.Module,
    tokenizer,
    items: Sequence[Encoded],
    *,
    max_new_tokens: int,
    batch_size: int,
    measure: bool = True,
    site: str = "act",
) -> tuple[dict[str, str], GenerationOutput]:
    """Greedy answers (id -> text) for encoded prompts, with prefill / decode density."""
    seq2seq = is_seq2seq(model)
    was_training = model.training
    model.eval()
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    answers: dict[str, str] = {}
    all_tokens: list[list[int]] = []
    prefill = decode = None
    try:
        if measure:
            from deftune.arch import find_activation_sites

            sites = find_activation_sites(model, site)  # type: ignore[arg-type]
            first = [s for s in sites if s.stack == "encoder"] if seq2seq else sites
            later = [s for s in sites if s.stack == "decoder"] if seq2seq else sites
            prefill = ActivationRecorder(model, first, site=site)  # type: ignore[arg-type]
            decode = ActivationRecorder(model, later, site=site)  # type: ignore[arg-type]
            prefill.attach()
            decode.attach()
        for start in track(range(0, len(items), batch_size), description="generating answers"):
            chunk = items[start : start + batch_size]
            toks = greedy_generate(model, prompt_batch(chunk, pad, seq2seq), eos_id=eos, pad_id=pad,
                                   max_new_tokens=max_new_tokens, prefill_recorder=prefill,
                                   decode_recorder=decode)
            for item, t in zip(chunk, toks):
                answers[item.id] = tokenizer.decode(t, skip_special_tokens=True).strip()
            all_tokens.extend(toks)
        result = GenerationOutput(all_tokens)
        if measure:
            result.prefill = prefill.result()
            has_decode = any(c.elements for c in decode.counts.values())
            result.decode = decode.result() if has_decode else None
        return answers, result
    finally:
        for rec in (prefill, decode):
            if rec is not None:
                rec.detach()
        model.train(was_training)


def teacher_forced_density(
    model: nn.Module, tokenizer, items: Sequence[Encoded], *, batch_size: int, site: str = "act"
) -> DensityResult:
    """Exact density on one forward pass over prompt + gold answer (real tokens only)."""
    seq2seq = is_seq2seq(model)
    batches = [training_batch(items[i : i + batch_size], tokenizer.pad_token_id, seq2seq)
               for i in range(0, len(items), batch_size)]
    return measure_density(model, batches, site=site, progress=True,  # type: ignore[arg-type]
                           description="teacher-forced density")


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer, texts: Sequence[str], *, max_length: int, batch_size: int) -> float:
    """Token-level perplexity of ``texts`` (each cut to ``max_length`` tokens) under a causal LM."""
    if is_seq2seq(model):
        raise NotImplementedError("perplexity of plain text is defined here for causal LMs only")
    if not texts:
        raise ValueError("perplexity needs at least one text")
    device = _device(model)
    nll, count = 0.0, 0
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    rows = [bos + tokenizer(t, add_special_tokens=False)["input_ids"][: max_length - len(bos)] for t in texts]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            width = max(len(r) for r in chunk)
            ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, r in enumerate(chunk):
                ids[i, : len(r)] = torch.tensor(r)
                mask[i, : len(r)] = 1
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits.float()  # (B, T, V)
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            tgt = ids[:, 1:]
            token_nll = -logp.gather(-1, tgt[..., None]).squeeze(-1)  # (B, T-1)
            real = mask[:, 1:].bool()
            nll += float(token_nll[real].sum())
            count += int(real.sum())
    finally:
        model.train(was_training)
    return math.exp(nll / max(count, 1))


@dataclass
class EvalReport:
    """Scores of one model state on the held-out questions."""

    exact_match: float
    f1: float
    questions: int
    density_teacher_forced: dict
    density_prefill: dict | None
    density_decode: dict | None
    perplexity: float | None
    predictions: dict[str, str] = field(default_factory=dict, repr=False)

    def summary(self) -> dict:
        """Headline numbers (no per-layer detail, no predictions)."""

        def overall(d: dict | None) -> float | None:
            return None if d is None else d["overall"]

        def per_stack(d: dict | None) -> dict | None:
            return None if d is None else d["per_stack"]

        return {
            "exact_match": self.exact_match,
            "f1": self.f1,
            "questions": self.questions,
            "density_teacher_forced": overall(self.density_teacher_forced),
            "density_teacher_forced_per_stack": per_stack(self.density_teacher_forced),
            "density_teacher_forced_tau_1e-3": _thresholded(self.density_teacher_forced, "0.001"),
            "density_prefill": overall(self.density_prefill),
            "density_decode": overall(self.density_decode),
            "perplexity": self.perplexity,
        }


def _thresholded(d: dict, key: str) -> float | None:
    layers = d["per_layer"].values()
    total = sum(v["tokens"] * v["features"] for v in layers)
    if key not in next(iter(d["per_layer"].values()))["thresholded"] or total == 0:
        return None
    return sum(v["thresholded"][key] * v["tokens"] * v["features"] for v in layers) / total


def evaluate_generative(
    model: nn.Module,
    tokenizer,
    examples: Sequence[SquadExample],
    items: Sequence[Encoded],
    *,
    max_new_tokens: int,
    batch_size: int,
    ppl_texts: Sequence[str] = (),
    ppl_max_length: int = 256,
    site: str = "act",
) -> EvalReport:
    """EM / F1 of greedy answers, teacher-forced and generation density, perplexity."""
    answers, gen = generate_answers(model, tokenizer, items, max_new_tokens=max_new_tokens,
                                    batch_size=batch_size, site=site)
    scores = squad_scores(answers, examples)
    tf = teacher_forced_density(model, tokenizer, items, batch_size=batch_size, site=site)
    ppl = None
    if ppl_texts and not is_seq2seq(model):
        ppl = perplexity(model, tokenizer, ppl_texts, max_length=ppl_max_length, batch_size=batch_size)
    return EvalReport(
        exact_match=scores["exact_match"], f1=scores["f1"], questions=len(examples),
        density_teacher_forced=tf.to_dict(),
        density_prefill=gen.prefill.to_dict() if gen.prefill else None,
        density_decode=gen.decode.to_dict() if gen.decode else None,
        perplexity=ppl, predictions=answers,
    )
