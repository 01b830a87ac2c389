"""Tiny random models (built from configs, no downloads) shared by the ADA-DEFT tests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], dict]
    n_blocks: int


def _bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=2,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    )
    return BertForSequenceClassification(cfg)


def _t5() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(
        vocab_size=64,
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        feed_forward_proj="gated-gelu",
        decoder_start_token_id=0,
        dropout_rate=0.1,
    )
    return T5ForConditionalGeneration(cfg)


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg)


def _gemma2() -> nn.Module:
    """Llama family, but the layer normalises the MLP output before the residual add."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=32,
        initializer_range=0.5,
    )
    return Gemma2ForCausalLM(cfg)


def _encoder_inputs() -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 64, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _t5_inputs() -> dict:
    out = _encoder_inputs()
    out["decoder_input_ids"] = torch.randint(1, 64, (2, 4), generator=torch.Generator().manual_seed(1))
    return out


CASES = [
    Case("bert", _bert, _encoder_inputs, 3),
    Case("t5", _t5, _t5_inputs, 4),
    Case("llama", _llama, _encoder_inputs, 3),
    Case("gemma2", _gemma2, _encoder_inputs, 3),
]


@pytest.fixture(params=CASES, ids=[c.name for c in CASES])
def case(request) -> Case:
    torch.manual_seed(0)
    return request.param


@pytest.fixture
def bert_case() -> Case:
    torch.manual_seed(0)
    return CASES[0]


@pytest.fixture
def t5_case() -> Case:
    torch.manual_seed(0)
    return CASES[1]


@pytest.fixture
def llama_case() -> Case:
    torch.manual_seed(0)
    return CASES[2]


@pytest.fixture
def gemma2_case() -> Case:
    torch.manual_seed(0)
    return CASES[3]


def _logits(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture
def logits() -> Callable[[nn.Module, dict], torch.Tensor]:
    """``logits(model, inputs)`` under ``no_grad``."""
    return _logits
