"""The method registry: name -> :class:`Method` (what apply / save / load / merge mean for it).

A method is one :class:`Method` value registered with :func:`register_method`; the public verbs of
:mod:`deftune.methods` look the method up by name and call its functions. The adapted model
remembers its (resolved) :class:`MethodConfig` in the attribute :data:`CONFIG_ATTR`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from deftune.methods.config import MethodConfig

CONFIG_ATTR = "deftune_method"  # attribute of an adapted model holding its resolved MethodConfig
CONFIG_FILE = "deftune_method.json"  # written by save_adapter next to the weights


class MergeNotSupportedError(RuntimeError):
    """Raised by ``merge_adapter`` / ``unmerge_adapter`` for a method that cannot be merged."""


def _no_virtual_tokens(model: nn.Module) -> int:
    return 0


@dataclass(frozen=True)
class Method:
    """What the public verbs do for one method.

    Attributes:
        name: registry key (``MethodConfig.name``).
        apply: ``apply(base_model, config) -> (model, resolved_config)``; freezes everything but
            the method's parameters and the task head.
        save: ``save(model, directory)`` writes the weights (the config file is written for it).
        load: ``load(base_model, directory, config, trainable) -> model``; with
            ``trainable=False`` every parameter is frozen.
        merge / unmerge: fold the method into the base weights and back; ``None`` when that is
            impossible (the verbs raise :class:`MergeNotSupportedError` with ``merge_note``).
        merge_note: why merging is impossible (shown in the error).
        virtual_tokens: leading virtual positions the method adds to activations.
        summary: one line for ``--help`` and docs.
    """

    name: str
    apply: Callable[[nn.Module, MethodConfig], tuple[nn.Module, MethodConfig]]
    save: Callable[[nn.Module, Path], None]
    load: Callable[[nn.Module, Path, MethodConfig, bool], nn.Module]
    merge: Callable[[nn.Module], None] | None = None
    unmerge: Callable[[nn.Module], None] | None = None
    merge_note: str = ""
    virtual_tokens: Callable[[nn.Module], int] = _no_virtual_tokens
    summary: str = ""


METHODS: dict[str, Method] = {}


def register_method(method: Method, *, overwrite: bool = False) -> Method:
    """Add ``method`` to :data:`METHODS` (``overwrite=True`` to replace an existing one)."""
    if method.name in METHODS and not overwrite:
        raise ValueError(f"method {method.name!r} is already registered; pass overwrite=True to replace it")
    METHODS[method.name] = method
    return method
