"""Prompt -> answer formatting for causal LMs and seq2seq models, with answer-only loss masks.

A question becomes a *prompt* (instruction, context, question) and a *target* (the answer and the
end-of-sequence token):

* causal LM: ``input_ids = prompt + target``, ``labels = [-100] * len(prompt) + target`` — the
  loss falls on the answer tokens only (``-100`` is ignored by ``CrossEntropyLoss``);
* seq2seq: ``input_ids = prompt``, ``labels = target`` (the decoder reads the shifted labels).

Prompt styles: ``chat`` renders the tokenizer's chat template (SmolLM2-Instruct's ``<|im_start|>``
turns) with a system line asking for a span copied from the context; ``plain`` is
``"Context: …\\nQuestion: …\\nAnswer:"`` for base and tiny models.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from deftune.data.squad import SquadExample, window_context

IGNORE_INDEX = -100


class DoesNotFit(ValueError):
    """A question whose prompt and answer exceed ``max_length`` even with the context cut down."""

SYSTEM_PROMPT = "Answer the question with a short span copied from the context."


@dataclass(frozen=True)
class Encoded:
    """One tokenised question: prompt ids and target ids (target ends with EOS)."""

    id: str
    prompt: list[int]
    target: list[int]


def resolve_style(style: str, tokenizer) -> str:
    if style == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "plain"
    if style == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ValueError("prompt_style='chat' needs a tokenizer with a chat template; use 'plain'")
    return style


def prompt_text(context: str, question: str, style: str, tokenizer, seq2seq: bool) -> str:
    """The prompt string (chat template already rendered for ``chat``)."""
    if style == "chat":
        messages = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": f"Context: {context}\nQuestion: {question}"},
        ]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if seq2seq:
        return f"question: {question} context: {context}"
    return f"Context: {context}\nQuestion: {question}\nAnswer:"


def encode_example(
    example: SquadExample,
    tokenizer,
    *,
    style: str,
    seq2seq: bool,
    max_length: int,
    max_context_tokens: int,
    seed: int = 0,
) -> Encoded:
    """Tokenise one question, cutting its context around the answer to fit ``max_length``.

    The context first gets ``max_context_tokens`` (see :func:`deftune.data.squad.window_context`);
    if prompt + target (the prompt alone for ``seq2seq``: the answer is the decoder's) still exceed
    ``max_length`` (long question or answer) the context budget becomes the window's length less
    the overflow and the window is cut again.
    """

    def n_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id: generation could not stop")
    answer = example.answer if (style == "chat" or seq2seq) else " " + example.answer
    target = tokenizer(answer, add_special_tokens=False)["input_ids"] + [eos]
    budget = max_context_tokens
    for _ in range(8):
        context, _start = window_context(example, budget, n_tokens, seed)
        text = prompt_text(context, example.question, style, tokenizer, seq2seq)
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
        if style == "plain" and tokenizer.bos_token_id is not None and not seq2seq:
            prompt = [tokenizer.bos_token_id] + prompt
        total = len(prompt) + (0 if seq2seq else len(target))
        over = total - max_length
        if over <= 0:
            break
        # shrink from the window actually used: whole sentences often leave it well under the budget,
        # and cutting the budget alone would take many rounds to reach it
        budget = max(1, min(budget, n_tokens(context)) - over)
    else:
        raise DoesNotFit(f"question {example.id}: prompt and answer do not fit max_length={max_length}")
    return Encoded(example.id, prompt, target)


def _pad(rows: Sequence[Sequence[int]], value: int, left: bool) -> Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            if left:
                out[i, width - len(r) :] = torch.tensor(r)
            else:
                out[i, : len(r)] = torch.tensor(r)
    return out


def training_batch(items: Sequence[Encoded], pad_id: int, seq2seq: bool) -> dict[str, Tensor]:
    """Right-padded model inputs with answer-only ``labels`` (``-100`` on prompt and padding)."""
    if seq2seq:
        ids = _pad([e.prompt for e in items], pad_id, left=False)  # (B, T_enc)
        mask = _pad([[1] * len(e.prompt) for e in items], 0, left=False)
        labels = _pad([e.target for e in items], IGNORE_INDEX, left=False)  # (B, T_dec)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels,
                "decoder_attention_mask": (labels != IGNORE_INDEX).long()}
    seqs = [e.prompt + e.target for e in items]
    ids = _pad(seqs, pad_id, left=False)  # (B, T)
    mask = _pad([[1] * len(s) for s in seqs], 0, left=False)
    labels = _pad([[IGNORE_INDEX] * len(e.prompt) + e.target for e in items], IGNORE_INDEX, left=False)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def prompt_batch(items: Sequence[Encoded], pad_id: int, seq2seq: bool) -> dict[str, Tensor]:
    """Prompts only, for generation: left-padded for causal LMs (the next token is at ``[:, -1]``)."""
    ids = _pad([e.prompt for e in items], pad_id, left=not seq2seq)
    mask = _pad([[1] * len(e.prompt) for e in items], 0, left=not seq2seq)
    return {"input_ids": ids, "attention_mask": mask}
