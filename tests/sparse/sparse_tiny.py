"""Tiny random BERT / LLaMA built from configs, and padded token batches, for the threshold tests."""

from __future__ import annotations

import torch


def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return BertForSequenceClassification(cfg).eval()


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


def batches(n: int = 3, b: int = 4, t: int = 12, seed: int = 0) -> list[dict]:
    """Random token batches whose last positions are padding (different per row)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 100, (b, t), generator=g)
        lengths = torch.randint(t // 2, t + 1, (b,), generator=g)
        mask = (torch.arange(t)[None, :] < lengths[:, None]).long()  # (B, T)
        out.append({"input_ids": ids * mask, "attention_mask": mask})
    return out
