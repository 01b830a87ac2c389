"""Configuration of ADA-DEFT training (gates) and of inference-time MLP-block skipping."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from deftune.ada.gates import GATES

DENSITY_WEIGHTINGS: tuple[str, ...] = ("gate", "gate_grad", "uniform")
SKIP_POLICY_NAMES: tuple[str, ...] = ("gate", "density", "topk")
SCORES: tuple[str, ...] = ("gate", "density")


def _check_number(
    name: str, value: Any, *, low: float = 0.0, low_open: bool = False, high: float = math.inf
) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and value <= high
    if not ok:
        bound = f"{'>' if low_open else '>='} {low}" + ("" if high == math.inf else f" and <= {high}")
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


@dataclass
class AdaConfig:
    """ADA-DEFT gates added to DEFT training (validated on construction).

    Attributes:
        gate: gate parameterisation, one of :data:`deftune.ada.gates.GATES`
            (``sigmoid``, ``hard_concrete``).
        init: inference gate value at step 0, in (0, 1) (``hard_concrete``: ``sigmoid(log_alpha)``).
        penalty: weight ``lambda`` of the gate penalty (mean gate "openness", in [0, 1]).
        penalty_warmup_steps: linear ramp of ``lambda`` from 0 over this many steps.
        logit_scale: gate logit = ``logit_scale · theta``; raises the gates' effective step size
            under Adam relative to the adapter weights (which share the optimiser's learning rate).
        density_weighting: how gates weight each layer's density loss: ``gate`` (detached gates,
            normalised to mean 1 per stack: closing blocks stop paying for sparsity), ``gate_grad``
            (the same, not detached: dense layers also push their gate down), ``uniform`` (off).
        temperature: temperature of ``sigmoid`` gates.
        beta: temperature of ``hard_concrete`` gates (Louizos et al.: 2/3).
        site: activation site kind used to find the MLP blocks (``act``/``product``).
    """

    gate: str = "hard_concrete"
    init: float = 0.9
    penalty: float = 0.1
    penalty_warmup_steps: int = 0
    logit_scale: float = 50.0
    density_weighting: str = "gate"
    temperature: float = 1.0
    beta: float = 2.0 / 3.0
    site: str = "act"

    def __post_init__(self) -> None:
        if self.gate not in GATES:
            raise ValueError(f"unknown gate parameterisation {self.gate!r}; choose one of {sorted(GATES)}")
        if self.density_weighting not in DENSITY_WEIGHTINGS:
            raise ValueError(
                f"density_weighting={self.density_weighting!r} is not one of {DENSITY_WEIGHTINGS}"
            )
        if not (isinstance(self.init, (int, float)) and 0.0 < self.init < 1.0):
            raise ValueError(f"init must be strictly between 0 and 1, got {self.init!r}")
        _check_number("penalty", self.penalty)
        _check_number("logit_scale", self.logit_scale, low_open=True)
        _check_number("temperature", self.temperature, low_open=True)
        _check_number("beta", self.beta, low_open=True)
        if (not isinstance(self.penalty_warmup_steps, int) or isinstance(self.penalty_warmup_steps, bool)
                or self.penalty_warmup_steps < 0):
            raise ValueError(f"penalty_warmup_steps must be an int >= 0, got {self.penalty_warmup_steps!r}")
        if self.site not in ("act", "product"):
            raise ValueError(f"site must be 'act' or 'product', got {self.site!r}")

    def penalty_at(self, step: int) -> float:
        """``lambda`` at optimiser step ``step`` (linear warm-up)."""
        if self.penalty_warmup_steps <= 0:
            return float(self.penalty)
        return float(self.penalty) * min(1.0, step / self.penalty_warmup_steps)

    def gate_kwargs(self) -> dict[str, float]:
        return {
            "init": self.init,
            "logit_scale": self.logit_scale,
            "temperature": self.temperature,
            "beta": self.beta,
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SkipConfig:
    """Which MLP blocks to remove at inference (validated on construction).

    Attributes:
        policy: ``gate`` (skip blocks whose learned inference gate is ``< tau``), ``density``
            (skip blocks whose measured activation density is ``< tau_density``; training-free,
            any model), or ``topk`` (keep the ``keep`` blocks with the highest ``score``).
        tau: gate threshold of the ``gate`` policy.
        tau_density: density threshold (a fraction in [0, 1]) of the ``density`` policy.
        keep: number of blocks kept by ``topk``.
        score: what ``topk`` ranks by: ``gate`` or ``density``.
        density_threshold: which density the ``density`` policy/score uses: ``None`` for exact
            (fraction of non-zero activations) or a ``tau`` for the fraction with ``|a| > tau``.
        stacks: restrict skipping to these stacks (``encoder``/``decoder``); empty: all.
    """

    policy: str = "gate"
    tau: float = 0.5
    tau_density: float = 0.1
    keep: int = 4
    score: str = "gate"
    density_threshold: float | None = None
    stacks: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.policy not in SKIP_POLICY_NAMES:
            raise ValueError(f"unknown skip policy {self.policy!r}; choose one of {SKIP_POLICY_NAMES}")
        if self.score not in SCORES:
            raise ValueError(f"score={self.score!r} is not one of {SCORES}")
        _check_number("tau", self.tau, high=1.0)
        _check_number("tau_density", self.tau_density, high=1.0)
        if not isinstance(self.keep, int) or isinstance(self.keep, bool) or self.keep < 0:
            raise ValueError(f"keep must be an int >= 0, got {self.keep!r}")
        if self.density_threshold is not None:
            _check_number("density_threshold", self.density_threshold)
        self.stacks = (self.stacks,) if isinstance(self.stacks, str) else tuple(self.stacks)
        bad = [s for s in self.stacks if s not in ("encoder", "decoder")]
        if bad:
            raise ValueError(f"stacks must be 'encoder'/'decoder', got {bad}")

    @property
    def needs_density(self) -> bool:
        return self.policy == "density" or (self.policy == "topk" and self.score == "density")

    @property
    def needs_gates(self) -> bool:
        return self.policy == "gate" or (self.policy == "topk" and self.score == "gate")
