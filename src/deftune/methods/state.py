"""Save / load a named subset of a model's parameters (deftune's own methods) as safetensors."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from deftune.runs import write_safetensors_atomic

WEIGHTS_FILE = "adapter_model.safetensors"  # the file name peft uses for adapter weights


def save_parameters(model: nn.Module, names: list[str], directory: Path) -> None:
    """Write the parameters ``names`` of ``model`` to ``directory / WEIGHTS_FILE``."""
    params = dict(model.named_parameters())
    write_safetensors_atomic(directory / WEIGHTS_FILE, {n: params[n].detach().contiguous() for n in names})


@torch.no_grad()
def load_parameters(model: nn.Module, names: list[str], directory: Path) -> None:
    """Copy ``directory / WEIGHTS_FILE`` into the parameters ``names``; the sets must be equal."""
    path = directory / WEIGHTS_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: not an adapter saved by deftune.methods.save_adapter"
        )
    tensors = load_file(str(path))
    missing = sorted(set(names) - set(tensors))
    unexpected = sorted(set(tensors) - set(names))
    if missing or unexpected:
        raise ValueError(
            f"{path} does not fit this model: missing {missing[:5]} ({len(missing)}), "
            f"unexpected {unexpected[:5]} ({len(unexpected)}); was it saved from another architecture?"
        )
    params = dict(model.named_parameters())
    for name in names:
        if params[name].shape != tensors[name].shape:
            raise ValueError(
                f"{name}: saved shape {tuple(tensors[name].shape)} != {tuple(params[name].shape)}"
            )
        params[name].copy_(tensors[name])


def parameter_io(apply, trained_names):
    """``(save, load)`` for a method whose state is a named subset of the model's parameters.

    ``apply(model, cfg) -> (model, resolved_cfg)`` adds/unfreezes the method;
    ``trained_names(model, resolved_cfg)`` lists the parameters it trains (what is saved).
    """
    from deftune.methods.registry import CONFIG_ATTR
    from deftune.methods.targets import freeze_all

    def save(model: nn.Module, directory: Path) -> None:
        save_parameters(model, trained_names(model, getattr(model, CONFIG_ATTR)), directory)

    def load(model: nn.Module, directory: Path, cfg, trainable: bool) -> nn.Module:
        model, resolved = apply(model, cfg)
        load_parameters(model, trained_names(model, resolved), directory)
        if not trainable:
            freeze_all(model)
        return model

    return save, load

