"""Every PEFT method under DEFT, behind one config and a few verbs.

::

    from deftune.methods import MethodConfig, apply_method, save_adapter, load_adapter
    model = apply_method(base_model, MethodConfig(name="lora"))   # only method params + head train
    ...train...
    save_adapter(model, "run/adapter")
    model2 = load_adapter(fresh_base_model, "run/adapter")       # same outputs

Methods (:data:`METHODS`): ``lora``, ``dora``, ``ia3``, ``prefix``, ``prompt``, ``ptuning``
(through ``peft``), ``adapter`` (bottleneck adapters) and ``bitfit`` (ours, same life cycle),
``full`` (full fine-tuning). ``apply_method`` changes ``base_model`` in place (as peft does) and
returns the model to train — for peft methods a ``PeftModel`` wrapping it. The adapted model keeps
its resolved :class:`MethodConfig` (targets and task head filled in) in ``model.deftune_method``.
See ``docs/methods.md`` for defaults, what trains, merge support and citations.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file
from torch import nn

from deftune.act_scale import SCALE_FILE, ScaledActivation, act_scale_state, add_act_scales, load_act_scales
from deftune.methods import bitfit, bottleneck, full, peft_methods  # noqa: F401  (register methods)
from deftune.methods.bottleneck import BottleneckLayer
from deftune.methods.config import MethodConfig
from deftune.methods.registry import (
    CONFIG_ATTR,
    CONFIG_FILE,
    METHODS,
    MergeNotSupportedError,
    Method,
    register_method,
)
from deftune.runs import write_json_atomic, write_safetensors_atomic

FORMAT_VERSION = 1

__all__ = [
    "METHODS",
    "MergeNotSupportedError",
    "Method",
    "MethodConfig",
    "apply_method",
    "load_adapter",
    "merge_adapter",
    "method_config",
    "register_method",
    "save_adapter",
    "unmerge_adapter",
    "virtual_token_count",
]


def _unwrapped(model: nn.Module):
    """``model``, then what it wraps, through DDP / accelerate (``.module``) and ``torch.compile``
    (``._orig_mod``) wrappers."""
    inner: nn.Module | None = model
    while inner is not None:
        yield inner
        inner = getattr(inner, "module", None) or getattr(inner, "_orig_mod", None)


def _adapted(model: nn.Module) -> tuple[nn.Module, MethodConfig | None]:
    """``(model carrying the method, its config)``, looking through wrappers (:func:`_unwrapped`)."""
    for inner in _unwrapped(model):
        if CONFIG_ATTR in inner.__dict__:
            return inner, inner.__dict__[CONFIG_ATTR]
    return model, None


def _require(model: nn.Module) -> tuple[nn.Module, MethodConfig]:
    inner, cfg = _adapted(model)
    if cfg is None:
        raise ValueError(
            f"{type(model).__name__} carries no deftune method: pass the model returned by "
            "deftune.methods.apply_method or load_adapter"
        )
    return inner, cfg


def method_config(model: nn.Module) -> MethodConfig:
    """The resolved :class:`MethodConfig` of a model returned by ``apply_method`` / ``load_adapter``."""
    return _require(model)[1]


def _attach(model: nn.Module, cfg: MethodConfig) -> nn.Module:
    model.__dict__[CONFIG_ATTR] = cfg  # plain attribute, not a submodule / parameter
    return model


def _check_fresh(model: nn.Module) -> None:
    for module in model.modules():
        if CONFIG_ATTR in module.__dict__:
            raise ValueError(
                f"this model already carries method {module.__dict__[CONFIG_ATTR].name!r}; "
                "apply a method to a fresh base model"
            )
        if isinstance(module, (BaseTunerLayer, BottleneckLayer, ScaledActivation)):
            raise ValueError(
                f"this model already carries adapter layers ({type(module).__name__}); apply a method "
                "to a fresh base model"
            )


def apply_method(model: nn.Module, config: MethodConfig | str) -> nn.Module:
    """Adapt ``model`` with ``config`` (a :class:`MethodConfig` or a method name).

    Only the method's parameters and the task head require grad afterwards (``full``: all).
    Returns the adapted model (``model`` itself, or a ``PeftModel`` wrapping it).
    """
    cfg = MethodConfig(name=config) if isinstance(config, str) else config
    _check_fresh(model)
    adapted, resolved = METHODS[cfg.name].apply(model, cfg)
    if cfg.act_scale != "none":
        add_act_scales(adapted, cfg.act_scale, grad=cfg.act_scale_grad)
    return _attach(adapted, resolved)


def save_adapter(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Save what the method trained to ``directory`` (created); returns the directory.

    peft methods: ``model.save_pretrained`` (``adapter_config.json`` + ``adapter_model.safetensors``);
    ``adapter`` / ``bitfit``: ``adapter_model.safetensors``; ``full``: the whole model through
    ``save_pretrained``. Every method also writes ``deftune_method.json`` (the resolved config), and
    ``act_scales.safetensors`` when the config has ``act_scale``.
    """
    model, cfg = _require(model)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    METHODS[cfg.name].save(model, out)
    if cfg.act_scale != "none":
        write_safetensors_atomic(out / SCALE_FILE, act_scale_state(model))
    write_json_atomic(out / CONFIG_FILE, {"format_version": FORMAT_VERSION, "method": cfg.to_dict()})
    return out


def load_adapter(model: nn.Module, directory: str | os.PathLike, *, trainable: bool = False) -> nn.Module:
    """Apply the method saved in ``directory`` to the fresh base ``model`` and load its weights.

    With ``trainable=False`` (default) every parameter is frozen and the model is put in eval mode
    (as ``peft``'s ``PeftModel.from_pretrained`` does); ``True`` restores the training set-up of
    ``apply_method`` (to resume training) and leaves the mode as it was.
    """
    path = Path(directory) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: save the adapter with deftune.methods.save_adapter")
    saved = json.loads(path.read_text())
    if saved.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {saved.get('format_version')!r} != {FORMAT_VERSION}")
    cfg = MethodConfig.from_dict(saved["method"])
    _check_fresh(model)
    loaded = METHODS[cfg.name].load(model, Path(directory), cfg, trainable)
    if cfg.act_scale != "none":
        scales = Path(directory) / SCALE_FILE
        if not scales.exists():
            raise FileNotFoundError(f"{scales} does not exist, but {path} says act_scale={cfg.act_scale!r}")
        add_act_scales(loaded, cfg.act_scale, trainable=trainable, grad=cfg.act_scale_grad)
        load_act_scales(loaded, load_file(str(scales)))
    if not trainable:
        loaded.eval()
    return _attach(loaded, cfg)


def _merge_verb(model: nn.Module, verb: str) -> None:
    model, cfg = _require(model)
    method = METHODS[cfg.name]
    fn = method.merge if verb == "merge" else method.unmerge
    if fn is None:
        mergeable = sorted(name for name, m in METHODS.items() if m.merge is not None)
        raise MergeNotSupportedError(
            f"cannot {verb} method {cfg.name!r}: {method.merge_note}. Methods that merge: {mergeable} "
            "(adapter: only with adapter_activation='identity')"
        )
    fn(model)


def merge_adapter(model: nn.Module) -> None:
    """Fold the method into the base weights (LoRA, DoRA, IA3, linear adapters; no-op for bitfit/full)."""
    _merge_verb(model, "merge")


def unmerge_adapter(model: nn.Module) -> None:
    """Undo :func:`merge_adapter`."""
    _merge_verb(model, "unmerge")


def virtual_token_count(model: nn.Module) -> int:
    """Leading virtual positions the method adds to every activation (prompt / P-tuning), else 0.

    Pass it to ``ActivationRecorder(..., skip_leading=n)`` / ``DensityRegularizer(...,
    skip_leading=n)`` so density is measured over real tokens only. Prefix tuning adds keys and
    values but no positions: 0. For encoder–decoder models the virtual tokens lead the encoder
    input only. A peft model built without deftune (``get_peft_model``) is read from its active
    adapter's config.
    """
    inner, cfg = _adapted(model)
    if cfg is not None:
        return METHODS[cfg.name].virtual_tokens(inner)
    from deftune.methods.virtual_positions import added_positions

    peft = next((m for m in _unwrapped(model) if getattr(type(m), "active_peft_config", None) is not None), None)
    return 0 if peft is None else added_positions(peft)
