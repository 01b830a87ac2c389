"""Tiny random models (built from configs, no downloads) and inputs for the method tests."""

from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

VOCAB = 100


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=2,
        hidden_act="gelu",
    )
    return BertForSequenceClassification(config).eval()


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2() -> GPT2LMHeadModel:
    """GPT-2: its projections are ``Conv1D`` (weight ``(in, out)``), which LoRA / IA3 must handle."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=128)
    return GPT2LMHeadModel(config).eval()


def tiny_batch(kind: str) -> dict[str, torch.Tensor]:
    """Two sequences of 7 tokens; the second has 3 padding positions (right for BERT, left for the
    causal LMs)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    if kind == "bert":
        mask[1, 4:] = 0
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1])}
    mask[1, :3] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


BUILDERS = {"bert": tiny_bert, "llama": tiny_llama, "gpt2": tiny_gpt2}
