"""PEFT methods for generative models: a name -> ``peft`` config factory registry.

Each factory takes the run's :class:`~deftune.generative.config.GenConfig`, the base model and
the peft ``TaskType`` and returns a ``peft`` config; :func:`apply_peft_method` (named apart from
:func:`deftune.methods.apply_method`, the classifiers' verb, whose arguments run the other way) calls
``peft.get_peft_model`` with it (we wrap peft, never register a peft type). Prompt-learning
methods (prompt / prefix tuning) are not listed: the greedy decoder in
:mod:`deftune.generative.evaluate` drives the model's KV cache itself, which those methods
replace with their own.

Add a method with::

    @register_peft_method("boft")
    def _boft(cfg, model, task_type):
        return peft.BOFTConfig(task_type=task_type, target_modules=cfg.target_list, boft_block_size=4)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from deftune.generative.config import GenConfig

PeftFactory = Callable[["GenConfig", nn.Module, str], object]
PEFT_METHODS: dict[str, PeftFactory] = {}


def register_peft_method(name: str) -> Callable[[PeftFactory], PeftFactory]:
    """Decorator: register ``factory(cfg, model, task_type) -> peft config`` under ``name``."""

    def deco(factory: PeftFactory) -> PeftFactory:
        PEFT_METHODS[name] = factory
        return factory

    return deco


@register_peft_method("lora")
def _lora(cfg: GenConfig, model: nn.Module, task_type: str):
    import peft

    return peft.LoraConfig(task_type=task_type, r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                           lora_dropout=cfg.lora_dropout, target_modules=cfg.target_list)


@register_peft_method("dora")
def _dora(cfg: GenConfig, model: nn.Module, task_type: str):
    import peft

    return peft.LoraConfig(task_type=task_type, r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                           lora_dropout=cfg.lora_dropout, target_modules=cfg.target_list, use_dora=True)


@register_peft_method("loha")
def _loha(cfg: GenConfig, model: nn.Module, task_type: str):
    import peft

    return peft.LoHaConfig(task_type=task_type, r=cfg.lora_r, alpha=cfg.lora_alpha, target_modules=cfg.target_list)


@register_peft_method("lokr")
def _lokr(cfg: GenConfig, model: nn.Module, task_type: str):
    import peft

    return peft.LoKrConfig(task_type=task_type, r=cfg.lora_r, alpha=cfg.lora_alpha, target_modules=cfg.target_list)


@register_peft_method("ia3")
def _ia3(cfg: GenConfig, model: nn.Module, task_type: str):
    # peft's per-architecture defaults (llama: k/v/down_proj, t5: k/v/wo, gpt2: c_attn/mlp.c_proj):
    # IA3 scales activations, so "all-linear" is not meaningful for it.
    import peft

    return peft.IA3Config(task_type=task_type)


def apply_peft_method(cfg: GenConfig, model: nn.Module) -> nn.Module:
    """``model`` with the run's PEFT method applied (``full``: all parameters trainable)."""
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    import peft

    task_type = "SEQ_2_SEQ_LM" if getattr(model.config, "is_encoder_decoder", False) else "CAUSAL_LM"
    return peft.get_peft_model(model, PEFT_METHODS[cfg.method](cfg, model, task_type))
