"""Density losses (elementwise surrogates of "is this activation non-zero?") and α schedules.

Each surrogate maps an activation ``a`` to a value in [0, 1) (``l1``: [0, ∞)) elementwise; the
recorder averages it over real tokens and features per layer, and the regulariser averages layers
(per-stack weights for encoder–decoder models):

    ρ̃_l       = mean_{t, f} φ(a_{l,t,f})
    L_density = Σ_s w_s · mean_{l in s} h(ρ̃_l)  /  Σ_s w_s
    L_total   = L_task + α(step) · L_density

with h(ρ̃) = ρ̃ (the paper's), or h(ρ̃) = max(0, ρ̃ − target) with a density ``target``: a per-layer
hinge that stops pushing a layer once its surrogate density is at the target (a deftune variant).

Surrogates (registry :data:`DENSITY_LOSSES`, add one with :func:`register_density_loss`):

* ``l0``      φ(a) = a² / (a² + ε)        DEFT (Runwal et al., AAAI 2025, arXiv 2402.01911), ε=1e-7
* ``tanh``    φ(a) = tanh(β |a|)          DEFT's variant for ReLU models
* ``sigmoid`` φ(a) = 2·sigmoid(β |a|) − 1  a smooth step with slope β/2 at 0
* ``l1``      φ(a) = |a|                  ProSparse (Song et al., 2024, arXiv 2402.13516)

Schedules (registry :data:`ALPHA_SCHEDULES`): ``constant``; ``linear`` warm-up from 0 to α over
``warmup_steps``; ``sine`` — ProSparse's progressive increase α·sin(π/2 · t/T) over
``warmup_steps``, then constant.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from deftune.arch import SITE_KINDS

SurrogateFactory = Callable[["DensityLossConfig"], Callable[[Tensor], Tensor]]
ScheduleFn = Callable[[float, int, int], float]  # (alpha, step, warmup_steps) -> alpha at that step
DENSITY_LOSSES: dict[str, SurrogateFactory] = {}
ALPHA_SCHEDULES: dict[str, Callable[[float, int, int], float]] = {}


def _finite_nonnegative(value) -> bool:
    """A real number (not a bool), finite and >= 0."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def register_density_loss(name: str) -> Callable[[SurrogateFactory], SurrogateFactory]:
    """Decorator: register ``factory(config) -> elementwise fn`` under ``name``."""

    def deco(factory: SurrogateFactory) -> SurrogateFactory:
        DENSITY_LOSSES[name] = factory
        return factory

    return deco


def register_alpha_schedule(name: str) -> Callable[[ScheduleFn], ScheduleFn]:
    """Decorator: register ``fn(alpha, step, warmup_steps) -> alpha_t`` under ``name``."""

    def deco(fn: ScheduleFn) -> ScheduleFn:
        ALPHA_SCHEDULES[name] = fn
        return fn

    return deco


@register_density_loss("l0")
def _l0(cfg: DensityLossConfig) -> Callable[[Tensor], Tensor]:
    eps = cfg.eps

    def fn(a: Tensor) -> Tensor:
        a2 = a.float().square()
        return a2 / (a2 + eps)

    return fn


@register_density_loss("tanh")
def _tanh(cfg: DensityLossConfig) -> Callable[[Tensor], Tensor]:
    beta = cfg.beta
    return lambda a: torch.tanh(beta * a.float().abs())


@register_density_loss("sigmoid")
def _sigmoid(cfg: DensityLossConfig) -> Callable[[Tensor], Tensor]:
    beta = cfg.beta
    return lambda a: 2.0 * torch.sigmoid(beta * a.float().abs()) - 1.0


@register_density_loss("l1")
def _l1(cfg: DensityLossConfig) -> Callable[[Tensor], Tensor]:
    return lambda a: a.float().abs()


@register_alpha_schedule("constant")
def _constant(alpha: float, step: int, warmup: int) -> float:
    return alpha


@register_alpha_schedule("linear")
def _linear(alpha: float, step: int, warmup: int) -> float:
    return alpha if warmup <= 0 else alpha * min(1.0, step / warmup)


@register_alpha_schedule("sine")
def _sine(alpha: float, step: int, warmup: int) -> float:
    return alpha if warmup <= 0 else alpha * math.sin(0.5 * math.pi * min(1.0, step / warmup))


@dataclass
class DensityLossConfig:
    """Configuration of the DEFT density regulariser (validated on construction).

    Attributes:
        loss: surrogate name, one of :data:`DENSITY_LOSSES` (``l0`` is the paper's).
        alpha: weight α of the density loss; 0 gives plain PEFT through the same code path.
        eps: ε of the ``l0`` surrogate (paper: 1e-7).
        beta: slope β of the ``tanh`` / ``sigmoid`` surrogates.
        schedule: α schedule, one of :data:`ALPHA_SCHEDULES`.
        warmup_steps: length of the ``linear`` / ``sine`` ramp.
        stack_weights: weight of each stack's mean layer loss (encoder–decoder models).
        site: ``act`` (activation output; activated gate for gated MLPs) or ``product``.
        count_padding: include padding tokens in the loss and the statistics (official code).
        target: None (the paper's loss: every layer's ρ̃_l is pushed down), or a density in
            (0, 1]: each layer's term is the hinge ``max(0, ρ̃_l − target)``, so a layer whose
            surrogate density is at the target feels no density loss and the task loss alone moves
            it. Since φ(a) < 1 for a ≠ 0, ρ̃_l never exceeds the exact density: a layer at the
            target can be denser than it. Not for the unbounded ``l1`` surrogate.
    """

    loss: str = "l0"
    alpha: float = 1.0
    eps: float = 1e-7
    beta: float = 10.0
    schedule: str = "constant"
    warmup_steps: int = 0
    stack_weights: dict[str, float] = field(default_factory=lambda: {"encoder": 1.0, "decoder": 1.0})
    site: str = "act"
    count_padding: bool = False
    target: float | None = None

    def __post_init__(self) -> None:
        if self.loss not in DENSITY_LOSSES:
            raise ValueError(
                f"unknown density loss {self.loss!r}; choose one of {sorted(DENSITY_LOSSES)} "
                "or register one with deftune.losses.register_density_loss"
            )
        if self.schedule not in ALPHA_SCHEDULES:
            raise ValueError(f"unknown alpha schedule {self.schedule!r}; choose one of {sorted(ALPHA_SCHEDULES)}")
        for name in ("alpha", "eps", "beta"):
            if not _finite_nonnegative(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)!r}")
        if self.eps <= 0:
            raise ValueError(f"eps must be > 0 (the paper uses 1e-7), got {self.eps!r}")
        if not isinstance(self.warmup_steps, int) or isinstance(self.warmup_steps, bool) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if self.site not in SITE_KINDS:
            raise ValueError(f"site must be one of {SITE_KINDS}, got {self.site!r}")
        bad = {k: v for k, v in self.stack_weights.items() if k not in ("encoder", "decoder") or not _finite_nonnegative(v)}
        if bad:
            raise ValueError(f"stack_weights keys must be 'encoder'/'decoder' with finite weights >= 0, got {bad}")
        if self.target is not None:
            if not _finite_nonnegative(self.target) or not 0 < self.target <= 1:
                raise ValueError(f"target must be None or a density in (0, 1], got {self.target!r}")
            if self.loss == "l1":
                raise ValueError("target is a density in (0, 1]; the l1 surrogate (mean |a|) is not one: use "
                                 "loss 'l0', 'tanh' or 'sigmoid', or leave target unset")

    def surrogate(self) -> Callable[[Tensor], Tensor]:
        """The elementwise surrogate φ."""
        return DENSITY_LOSSES[self.loss](self)

    def alpha_at(self, step: int) -> float:
        """α at optimizer step ``step`` (0-based)."""
        return ALPHA_SCHEDULES[self.schedule](self.alpha, step, self.warmup_steps)

    def layer_term(self, rho: Tensor) -> Tensor:
        """A layer's term of the density loss from its surrogate density ``rho`` (a 0-d tensor):
        ``rho`` itself, or the hinge ``max(0, rho − target)`` when a target is set."""
        return rho if self.target is None else (rho - self.target).clamp_min(0.0)


def combine_layer_losses(
    losses: dict[str, Tensor], stack_of: dict[str, str], stack_weights: dict[str, float]
) -> Tensor:
    """Average per-layer losses within each stack, then take the weighted mean over stacks."""
    if not losses:
        raise RuntimeError(
            "no density loss was recorded in this forward pass: is the recorder attached and "
            "are gradients enabled? (Re-entrant gradient checkpointing runs the forward without "
            "gradients: use gradient_checkpointing_enable(gradient_checkpointing_kwargs="
            "{'use_reentrant': False}).)"
        )
    by_stack: dict[str, list[Tensor]] = {}
    for name, value in losses.items():
        by_stack.setdefault(stack_of[name], []).append(value)
    total = None
    weight_sum = 0.0
    for stack, values in by_stack.items():
        w = float(stack_weights.get(stack, 1.0))
        term = torch.stack(values).mean() * w
        total = term if total is None else total + term
        weight_sum += w
    if weight_sum == 0:
        return total * 0.0
    return total / weight_sum
