"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020), registered as method ``adapter``.

Life cycle, as for peft adapters: :func:`apply` wraps projections and freezes everything else
(the task head keeps training) -> train -> save (``adapter_model.safetensors`` with the adapters
and the head; the resolved config goes to ``deftune_method.json``) -> load onto a fresh base ->
merge / unmerge (``adapter_activation="identity"`` only: non-linear adapters cannot be folded).
"""

from __future__ import annotations

from torch import nn

from deftune.methods.bottleneck.config import BottleneckConfig
from deftune.methods.bottleneck.layer import BottleneckLayer
from deftune.methods.bottleneck.model import (
    adapter_layers,
    adapter_parameter_names,
    add_adapters,
    merge_adapters,
    resolve_targets,
    unmerge_adapters,
)
from deftune.methods.config import MethodConfig
from deftune.methods.registry import Method, register_method
from deftune.methods.state import parameter_io
from deftune.methods.targets import freeze_all, head_module_names, head_parameter_names, infer_task_type

__all__ = ["BottleneckConfig", "BottleneckLayer", "adapter_layers", "add_adapters", "resolve_targets"]


def _trained_names(model: nn.Module, cfg: MethodConfig) -> list[str]:
    return adapter_parameter_names(model) + head_parameter_names(model, cfg.modules_to_save or ())


def _apply(model: nn.Module, cfg: MethodConfig) -> tuple[nn.Module, MethodConfig]:
    task = cfg.task_type or infer_task_type(model)
    heads = head_module_names(model, task, cfg.modules_to_save)
    config = BottleneckConfig.from_method_config(cfg)
    paths = resolve_targets(model, config)
    if not paths:
        raise ValueError(f"no projection of {type(model).__name__} to wrap with a bottleneck adapter")
    add_adapters(model, config, paths)  # checks every target before it changes the model
    freeze_all(model)
    resolved = cfg.replace(target_modules=tuple(paths), modules_to_save=heads, task_type=task)
    params = dict(model.named_parameters())
    for name in _trained_names(model, resolved):
        params[name].requires_grad_(True)
    return model, resolved


_save, _load = parameter_io(_apply, _trained_names)


register_method(
    Method(
        name="adapter",
        apply=_apply,
        save=_save,
        load=_load,
        merge=merge_adapters,
        unmerge=unmerge_adapters,
        summary="bottleneck adapters (Houlsby / Pfeiffer), sequential or parallel",
    )
)
