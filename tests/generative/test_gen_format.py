"""Prompt -> answer encoding: the loss falls on answer tokens only."""

from __future__ import annotations

import torch
from gen_helpers import encode_all

from deftune.generative.format import IGNORE_INDEX, prompt_batch, training_batch
from deftune.generative.models import load_generative, tiny_tokenizer


def test_causal_labels_mask_prompt_and_padding(examples):
    tok = tiny_tokenizer()
    items = encode_all(examples[:3], tok, seq2seq=False)
    batch = training_batch(items, tok.pad_token_id, seq2seq=False)
    for row, item in enumerate(items):
        n_p, n_t = len(item.prompt), len(item.target)
        labels = batch["labels"][row]
        assert (labels[:n_p] == IGNORE_INDEX).all()  # prompt
        assert labels[n_p : n_p + n_t].tolist() == item.target  # answer + EOS
        assert (labels[n_p + n_t :] == IGNORE_INDEX).all()  # padding
        assert batch["attention_mask"][row].sum() == n_p + n_t
        assert item.target[-1] == tok.eos_token_id
        assert tok.decode(item.target[:-1]).strip() == examples[row].answer


def test_seq2seq_labels_are_the_target(examples):
    tok = tiny_tokenizer()
    items = encode_all(examples[:2], tok, seq2seq=True)
    batch = training_batch(items, tok.pad_token_id, seq2seq=True)
    for row, item in enumerate(items):
        n = len(item.target)
        assert batch["labels"][row, :n].tolist() == item.target
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert batch["decoder_attention_mask"][row].sum() == n


def test_causal_loss_is_answer_only_cross_entropy(examples):
    model, tok = load_generative("tiny-llama")
    items = encode_all(examples[:3], tok, seq2seq=False)
    batch = training_batch(items, tok.pad_token_id, seq2seq=False)
    with torch.no_grad():
        out = model(**batch)
    logits = out.logits[:, :-1]  # (B, T-1, V): position t predicts token t+1
    target = batch["input_ids"][:, 1:]
    answer = batch["labels"][:, 1:] != IGNORE_INDEX
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
    assert torch.allclose(out.loss, nll[answer].mean(), atol=1e-5)
    assert not torch.allclose(out.loss, nll[batch["attention_mask"][:, 1:].bool()].mean(), atol=1e-5)


def test_prompt_batch_left_pads_for_causal(examples):
    tok = tiny_tokenizer()
    items = encode_all(examples[:3], tok, seq2seq=False)
    batch = prompt_batch(items, tok.pad_token_id, seq2seq=False)
    assert (batch["attention_mask"][:, -1] == 1).all()  # every prompt ends at the last column
    for row, item in enumerate(items):
        assert batch["input_ids"][row, -len(item.prompt) :].tolist() == item.prompt


def test_long_context_is_cut_to_fit(examples):
    tok = tiny_tokenizer()
    ex = examples[0]
    long = type(ex)(ex.id, ex.title, "Filler words go here. " * 40 + ex.context, ex.question, ex.answers,
                    (ex.starts[0] + len("Filler words go here. ") * 40,))
    (item,) = encode_all([long], tok, seq2seq=False, max_length=96)
    assert len(item.prompt) + len(item.target) <= 96
    assert ex.answer in tok.decode(item.prompt)
