"""Thresholds at run time: the calibrated values and the wrappers / hooks that apply them.

:class:`Thresholds` is what :func:`deftune.sparse.calibrate.calibrate_thresholds` returns (per-layer
``t``, what it achieved on the calibration data; JSON save / load). :func:`apply_thresholds` makes
``|a| <= t`` an exact 0 at every site it names: output sites (the activation module) are wrapped in
:class:`ThresholdedActivation`; input sites (``site="product"``: the down projection's input) get an
:class:`InputThreshold` forward pre-hook, which leaves adapters on that layer and state-dict keys
untouched. :func:`remove_thresholds` undoes it; :func:`thresholded` does both around a block. The
comparison runs in float32 for half-precision tensors so it matches calibration exactly.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from deftune.arch import SITE_KINDS, ActivationSite, find_activation_sites

__all__ = [
    "InputThreshold",
    "ThresholdedActivation",
    "Thresholds",
    "apply_thresholds",
    "ramped_thresholds",
    "remove_thresholds",
    "threshold_holders",
    "thresholded",
]


# ---- the result --------------------------------------------------------------------------------


@dataclass
class Thresholds:
    """Per-layer thresholds ``t`` (activations with ``|a| <= t`` become 0) and what they achieve.

    Attributes:
        values: layer name (``"encoder.3"``) -> threshold ``t`` (a float32 value).
        target: the density asked for.
        mode: ``layer`` or ``global``.
        achieved: layer -> density ``|a| > t`` on the calibration data (exact, real tokens).
        natural: layer -> exact non-zero density before this layer's threshold (calibration data,
            earlier layers thresholded when refined).
        elements: layer -> calibration activations counted (tokens x features).
        site: the activation site kind the thresholds act on (``act`` or ``product``).
        refine_passes: calibration passes made after the first, with thresholds applied (fewer than
            asked when all thresholds are 0).
    """

    values: dict[str, float]
    target: float
    mode: str
    achieved: dict[str, float]
    natural: dict[str, float]
    elements: dict[str, int]
    site: str = "act"
    refine_passes: int = 0

    @property
    def overall_achieved(self) -> float:
        """Element-weighted density over all layers on the calibration data."""
        total = sum(self.elements.values())
        return sum(self.achieved[k] * n for k, n in self.elements.items()) / max(total, 1)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["overall_achieved"] = self.overall_achieved
        return out

    @classmethod
    def from_dict(cls, data: Mapping) -> Thresholds:
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in names})

    def save(self, path: str | Path) -> None:
        """Write JSON atomically (temp file in the same folder, then ``os.replace``)."""
        from deftune.runs import write_json_atomic

        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Thresholds:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def table(self) -> str:
        lines = [
            f"Thresholds ({self.mode}, target {self.target:g})",
            f"{'layer':<12}{'t':>12}{'natural':>9}{'achieved':>10}",
        ]
        for name, t in self.values.items():
            lines.append(f"{name:<12}{t:>12.4g}{self.natural[name]:>9.4f}{self.achieved[name]:>10.4f}")
        lines.append(f"{'overall':<12}{'':>12}{'':>9}{self.overall_achieved:>10.4f}")
        return "\n".join(lines)


# ---- application -------------------------------------------------------------------------------


def _zero_at_most(a: Tensor, threshold: float) -> Tensor:
    """``a`` with ``|a| <= threshold`` set to 0, compared in float32 for half-precision inputs (so
    it matches calibration exactly)."""
    mag = a.abs() if a.dtype in (torch.float32, torch.float64) else a.abs().float()
    return a.masked_fill(mag <= threshold, 0.0)


def check_threshold(threshold: float, where: str = "") -> None:
    """Raise ``ValueError`` unless ``threshold`` is a finite number >= 0."""
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not (
            math.isfinite(threshold) and threshold >= 0):
        raise ValueError(f"threshold{where} must be finite and >= 0, got {threshold!r}")


class ThresholdedActivation(nn.Module):
    """Wraps an activation module; outputs with ``|a| <= threshold`` become exactly 0.

    The threshold is a plain float (not a buffer), so ``model.to(dtype)`` cannot round it; the
    comparison runs in float32 for half-precision outputs, so it matches calibration exactly.
    """

    def __init__(self, inner: nn.Module, threshold: float) -> None:
        super().__init__()
        check_threshold(threshold)
        self.inner = inner
        self.threshold = float(threshold)

    def forward(self, *args, **kwargs) -> Tensor:
        return _zero_at_most(self.inner(*args, **kwargs), self.threshold)  # (..., F)

    def density_output(self, x: Tensor, output: Tensor) -> Tensor:
        """What the density loss sees: the wrapped module's own view (density-only activation
        scales, :meth:`deftune.act_scale.ScaledActivation.density_output`), thresholded like
        ``output``; ``output`` itself when the wrapped module has none."""
        view = getattr(self.inner, "density_output", None)
        inner_view = output if view is None else view(x, output)  # the inner module returns `output` when it has no view of its own
        return output if inner_view is output else _zero_at_most(inner_view, self.threshold)

    def extra_repr(self) -> str:
        return f"threshold={self.threshold:.4g}"


class InputThreshold:
    """A forward pre-hook that sets ``|x| <= threshold`` of a module's first input to exactly 0.

    Installed by :func:`apply_thresholds` on input sites (the down projection of a gated MLP); the
    hook object is kept on the module as ``module.deftune_input_threshold`` (with its handle), so
    :func:`threshold_holders` finds it and :func:`remove_thresholds` takes it off. Whatever replaces
    the module (e.g. ``merge_and_unload`` of an adapter) drops the hook: apply the thresholds again.
    """

    ATTR = "deftune_input_threshold"

    def __init__(self, threshold: float) -> None:
        check_threshold(threshold)
        self.threshold = float(threshold)
        self.handle: torch.utils.hooks.RemovableHandle | None = None

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        return (_zero_at_most(args[0], self.threshold), *args[1:])  # (..., F)

    def attach(self, module: nn.Module) -> None:
        self.handle = module.register_forward_pre_hook(self, prepend=True)  # ahead of any recorder
        setattr(module, self.ATTR, self)

    def detach(self, module: nn.Module) -> None:
        if self.handle is not None:
            self.handle.remove()
        if getattr(module, self.ATTR, None) is self:
            delattr(module, self.ATTR)


def threshold_holders(model: nn.Module) -> list[ThresholdedActivation | InputThreshold]:
    """Every threshold installed on ``model`` (wrappers and input hooks), each with a mutable
    ``.threshold``, in module order."""
    out: list[ThresholdedActivation | InputThreshold] = []
    for m in model.modules():
        if isinstance(m, ThresholdedActivation):
            out.append(m)
        hook = getattr(m, InputThreshold.ATTR, None)
        if isinstance(hook, InputThreshold):
            out.append(hook)
    return out


def _sites_for(model: nn.Module, thresholds: Thresholds) -> list[ActivationSite]:
    if thresholds.site not in SITE_KINDS:
        raise ValueError(f"thresholds.site must be one of {list(SITE_KINDS)}, got {thresholds.site!r}")
    sites = {s.name: s for s in find_activation_sites(model, thresholds.site)}  # type: ignore[arg-type]
    unknown = sorted(set(thresholds.values) - set(sites))
    if unknown:
        raise KeyError(f"thresholds name layers {unknown} that the model lacks; its layers: {sorted(sites)}")
    return [sites[name] for name in thresholds.values]


def _install(model: nn.Module, site: ActivationSite, t: float) -> None:
    current = model.get_submodule(site.module_path)
    if site.hook == "input":
        hook = getattr(current, InputThreshold.ATTR, None)
        if isinstance(hook, InputThreshold):
            hook.threshold = float(t)
        else:
            InputThreshold(t).attach(current)
    elif isinstance(current, ThresholdedActivation):
        current.threshold = float(t)
    else:
        model.set_submodule(site.module_path, ThresholdedActivation(current, t))


def apply_thresholds(model: nn.Module, thresholds: Thresholds) -> list[str]:
    """Threshold every site of ``thresholds`` in place; returns the module paths touched.

    Output sites: the activation module is wrapped (:class:`ThresholdedActivation`); input sites:
    an :class:`InputThreshold` pre-hook goes on the module. Re-applying updates the thresholds (no
    double wrapping). Layers absent from ``thresholds`` are left alone; a layer the model lacks
    raises ``KeyError``. Apply after adapters that replace the thresholded module (peft on
    ``down_proj``), so that the hook sits on the module the model finally calls.
    """
    sites = _sites_for(model, thresholds)
    for site in sites:  # every value is checked before the first layer changes
        check_threshold(thresholds.values[site.name], f" of {site.name}")
    paths = []
    for site in sites:
        _install(model, site, thresholds.values[site.name])
        paths.append(site.module_path)
    return paths


def remove_thresholds(model: nn.Module) -> int:
    """Put every wrapped activation module back (the original objects) and take every input
    threshold off; returns how many."""
    wrapped = [(name, m) for name, m in model.named_modules() if isinstance(m, ThresholdedActivation)]
    for name, module in wrapped:
        model.set_submodule(name, module.inner)
    hooked = [(m, h) for m in model.modules() if isinstance(h := getattr(m, InputThreshold.ATTR, None), InputThreshold)]
    for module, hook in hooked:
        hook.detach(module)
    return len(wrapped) + len(hooked)


@contextmanager
def thresholded(model: nn.Module, thresholds: Thresholds) -> Iterator[nn.Module]:
    """Within the block ``model`` runs with ``thresholds`` applied; on exit every touched
    site is exactly what it was before (also when the body raises)."""
    sites = _sites_for(model, thresholds)
    before = {s.module_path: model.get_submodule(s.module_path) for s in sites}
    saved = {p: m.threshold for p, m in before.items() if isinstance(m, ThresholdedActivation)}
    hooks = {p: getattr(m, InputThreshold.ATTR, None) for p, m in before.items()}
    saved_hooks = {p: h.threshold for p, h in hooks.items() if isinstance(h, InputThreshold)}
    try:
        apply_thresholds(model, thresholds)
        yield model
    finally:
        for site in sites:
            path, module = site.module_path, before[site.module_path]
            if site.hook == "input":
                hook = getattr(module, InputThreshold.ATTR, None)
                if path in saved_hooks:
                    hook.threshold = saved_hooks[path]  # type: ignore[union-attr]
                elif isinstance(hook, InputThreshold):
                    hook.detach(module)
                continue
            if path in saved:
                module.threshold = saved[path]  # type: ignore[assignment]
            model.set_submodule(path, module)


@contextmanager
def ramped_thresholds(model: nn.Module, factor: Callable[[int], float], steps: int) -> Iterator[Callable[[int], float]]:
    """Ramp the thresholds installed on ``model`` in during training.

    Yields ``set_step(step) -> f``: for ``step <= steps`` it sets every threshold
    (:func:`threshold_holders`) to ``f · t_l`` with ``f = factor(step)`` (``factor`` should reach 1 by
    ``steps``); later steps set the installed ``t_l`` (``f = 1``), so the factor returned is always
    the one in force. On exit every threshold is its installed ``t_l`` again,
    also when training raises, so what is evaluated and saved is the calibrated model. ``steps = 0``
    changes nothing. Used by both training loops (GLUE: linear, ``TrainConfig.act_threshold_ramp``;
    generative: sine, ``GenConfig.act_threshold_warmup_steps``).
    """
    holders = threshold_holders(model)
    final = [h.threshold for h in holders]
    written: list[float | None] = [None]  # the factor in force, so later steps past the ramp write nothing

    def set_step(step: int) -> float:
        if steps <= 0:
            return 1.0  # no ramp: the installed thresholds, untouched
        f = factor(step) if step <= steps else 1.0
        if f != written[0]:
            for h, t in zip(holders, final):
                h.threshold = t * f
            written[0] = f
        return f

    try:
        yield set_step
    finally:
        for h, t in zip(holders, final):
            h.threshold = t
