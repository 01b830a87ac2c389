"""Shared fixtures: tiny models built in code, one thread (the test machine is shared)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny_bert(seed: int = 0, num_labels: int = 2):
    """A 2-layer BERT classifier (hidden 32, MLP 64) with random weights."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, num_labels=num_labels,
    )
    return BertForSequenceClassification(cfg).eval()


def _tiny_batches(n_batches: int = 4, batch: int = 8, seq: int = 12, seed: int = 0, vocab: int = 64):
    """Random token batches with some padding and a label that depends on the tokens."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(1, vocab, (batch, seq), generator=g)
        lengths = torch.randint(seq // 2, seq + 1, (batch,), generator=g)
        mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
        ids = ids * mask
        labels = (ids[:, 1] % 2).long()
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


@pytest.fixture
def tiny_bert():
    """Factory fixture: ``tiny_bert(seed=0)`` builds a fresh tiny BERT classifier."""
    return _tiny_bert


@pytest.fixture
def tiny_batches():
    """Factory fixture: ``tiny_batches(n_batches=4, ...)`` makes random labelled batches."""
    return _tiny_batches
