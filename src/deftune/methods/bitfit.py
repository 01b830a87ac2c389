"""BitFit (Ben Zaken, Ravfogel & Goldberg, ACL 2022, arXiv 2106.10199): train only the biases.

Every parameter named ``*.bias`` trains (attention, MLP and LayerNorm biases), plus the task head
(``classifier`` / ``score`` for sequence classification). The biases are the base model's own,
so the method is always "merged": ``merge_adapter`` / ``unmerge_adapter`` do nothing. Save / load
writes the biases and the head to ``adapter_model.safetensors``.

Models without biases (LLaMA-style) are rejected: BitFit would train nothing but the head.
"""

from __future__ import annotations

from torch import nn

from deftune.methods.config import MethodConfig
from deftune.methods.registry import Method, register_method
from deftune.methods.state import parameter_io
from deftune.methods.targets import freeze_all, head_module_names, head_parameter_names, infer_task_type


def bias_parameter_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters() if n == "bias" or n.endswith(".bias")]


def _trained_names(model: nn.Module, cfg: MethodConfig) -> list[str]:
    biases = bias_parameter_names(model)
    head = head_parameter_names(model, cfg.modules_to_save or ())
    return biases + [n for n in head if n not in set(biases)]


def _apply(model: nn.Module, cfg: MethodConfig) -> tuple[nn.Module, MethodConfig]:
    task = cfg.task_type or infer_task_type(model)
    heads = head_module_names(model, task, cfg.modules_to_save)
    head = set(head_parameter_names(model, heads))
    if not [n for n in bias_parameter_names(model) if n not in head]:
        raise ValueError(
            f"bitfit: {type(model).__name__} has no bias parameters outside the task head (LLaMA-style "
            "models have none); BitFit would train only the head. Choose another method."
        )
    resolved = cfg.replace(modules_to_save=heads, task_type=task)
    freeze_all(model)
    params = dict(model.named_parameters())
    for name in _trained_names(model, resolved):
        params[name].requires_grad_(True)
    return model, resolved


_save, _load = parameter_io(_apply, _trained_names)


def _already_merged(model: nn.Module) -> None:
    """BitFit trains the base model's own biases: nothing to fold in or out."""


register_method(
    Method(
        name="bitfit",
        apply=_apply,
        save=_save,
        load=_load,
        merge=_already_merged,
        unmerge=_already_merged,
        summary="BitFit: only the bias terms (and the task head) train",
    )
)
