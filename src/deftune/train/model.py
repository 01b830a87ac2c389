"""Building the model of a run: base model + task head + PEFT method."""

from __future__ import annotations

import torch
from torch import nn

from deftune.data.glue import get_task
from deftune.train.config import TrainConfig


def build_base_model(config: TrainConfig):
    """``(model, tokenizer)``: the pre-trained encoder with a fresh task head (seeded)."""
    from deftune import models

    task = get_task(config.task)
    torch.manual_seed(config.seed)  # the task head's initialisation
    model = models.load_for_classification(config.model, task.num_labels)
    tokenizer = models.load_tokenizer(config.model)
    return model, tokenizer


def build_model(config: TrainConfig) -> tuple[nn.Module, object]:
    """``(adapted model, tokenizer)``: base model with the run's PEFT method applied."""
    from deftune.methods import MethodConfig, apply_method

    base, tokenizer = build_base_model(config)
    model = apply_method(base, MethodConfig(name=config.method, **config.method_options))
    return model, tokenizer


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in trainable_parameters(model))
