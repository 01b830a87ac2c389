"""Full fine-tuning (method ``full``): every parameter trains; the whole model is saved.

``save_adapter`` writes the model with ``save_pretrained`` (``config.json`` + ``model*.safetensors``,
loadable by ``from_pretrained`` too); ``load_adapter`` copies those weights into the given base
model. Merging is a no-op: the weights *are* the model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from deftune.methods.config import MethodConfig
from deftune.methods.registry import Method, register_method
from deftune.methods.targets import freeze_all


def _apply(model: nn.Module, cfg: MethodConfig) -> tuple[nn.Module, MethodConfig]:
    for p in model.parameters():
        p.requires_grad_(True)
    return model, cfg


def _save(model: nn.Module, directory: Path) -> None:
    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"full fine-tuning saves through save_pretrained; {type(model).__name__} has none")
    model.save_pretrained(str(directory))


def _tied_aliases(model: nn.Module) -> set[str]:
    """Parameter names that share their tensor with an earlier name (tied weights)."""
    seen: dict[int, str] = {}
    aliases = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            aliases.add(name)
        else:
            seen[id(p)] = name
    return aliases


@torch.no_grad()
def _load(model: nn.Module, directory: Path, cfg: MethodConfig, trainable: bool) -> nn.Module:
    files = sorted(directory.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no model*.safetensors in {directory}: not a full fine-tuning save")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    if cfg.act_scale != "none":  # the learned scales are loaded from their own file after this
        state = {k: v for k, v in state.items() if not k.endswith(".log_scale")}
    result = model.load_state_dict(state, strict=False)
    tied = _tied_aliases(model)
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{directory} does not fit {type(model).__name__}: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    if trainable:
        _apply(model, cfg)
    else:
        freeze_all(model)
    return model


def _already_merged(model: nn.Module) -> None:
    """Full fine-tuning changes the weights themselves: nothing to fold in or out."""


register_method(
    Method(
        name="full",
        apply=_apply,
        save=_save,
        load=_load,
        merge=_already_merged,
        unmerge=_already_merged,
        summary="full fine-tuning: every parameter trains",
    )
)
