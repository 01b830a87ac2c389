"""Gate parameterisations: one scalar gate ``g_l in [0, 1]`` per MLP block, from a trainable logit.

Registry :data:`GATES` (add one with :func:`register_gate`). Each gate module holds a logit vector
``theta`` of shape ``(L,)`` (one entry per MLP block) and gives

* :meth:`Gates.sample` — the gates used in a *training* forward pass (may be stochastic);
* :meth:`Gates.deterministic` — the gates used at inference (and by skip policies);
* :meth:`Gates.penalty` — a differentiable measure of "how many gates are open", in [0, 1]
  (mean over blocks), that the ADA-DEFT loss multiplies by ``lambda``.

The effective logit is ``s · theta`` with ``s = AdaConfig.logit_scale``: with Adam the step in
``theta`` is about ``lr`` whatever the gradient's size, so ``s`` sets how fast gates can move
relative to the adapter weights sharing the same learning rate (a reparameterisation, not a
change of the model).

Built-in parameterisations:

``sigmoid``
    ``g = sigmoid(s·theta / T)``; penalty ``mean_l g_l`` (an L1 penalty on non-negative gates).
    Never exactly 0 or 1, so skipping a block with ``g < tau`` drops a ``g``-scaled contribution.

``hard_concrete``
    The hard-concrete distribution of Louizos, Welling & Kingma, "Learning Sparse Neural Networks
    through L0 Regularization", ICLR 2018 (arXiv 1712.01312), eqs. 10–13 with their constants
    ``beta = 2/3``, ``gamma = -0.1``, ``zeta = 1.1``:

        u ~ U(0, 1);  s = sigmoid((log u - log(1 - u) + log_alpha) / beta)
        g = min(1, max(0, s · (zeta - gamma) + gamma))                       (training sample)
        g_test = min(1, max(0, sigmoid(log_alpha) · (zeta - gamma) + gamma))  (inference)
        P(g != 0) = sigmoid(log_alpha - beta · log(-gamma / zeta))           (penalty: expected L0)

    The stretch-and-clip puts finite probability mass on exactly 0 and exactly 1, so closed gates
    are exactly closed and skipping them is exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

GATES: dict[str, type[Gates]] = {}


def register_gate(name: str) -> Callable[[type[Gates]], type[Gates]]:
    """Class decorator: register a :class:`Gates` subclass under ``name``."""

    def deco(cls: type[Gates]) -> type[Gates]:
        GATES[name] = cls
        cls.kind = name
        return cls

    return deco


def logit(p: float) -> float:
    """``log(p / (1 - p))`` for ``0 < p < 1``."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"a probability strictly between 0 and 1 is needed, got {p!r}")
    return math.log(p) - math.log1p(-p)


class Gates(nn.Module):
    """Base class: ``n`` gates from a logit vector ``theta`` (``(n,)``).

    Args:
        n: number of gated MLP blocks.
        init: the inference gate value at step 0, strictly between 0 and 1 (see subclasses for
            how it maps to the logit).
        logit_scale: ``s`` in ``logit = s · theta``.
    """

    kind: str = ""

    def __init__(self, n: int, init: float = 0.9, logit_scale: float = 1.0, **_: float) -> None:
        super().__init__()
        if n < 1:
            raise ValueError(f"need at least one gate, got n={n}")
        if not logit_scale > 0:
            raise ValueError(f"logit_scale must be > 0, got {logit_scale!r}")
        self.logit_scale = float(logit_scale)
        self.theta = nn.Parameter(torch.full((n,), self.init_logit(init) / self.logit_scale))

    def init_logit(self, init: float) -> float:
        return logit(init)

    @property
    def logits(self) -> Tensor:
        return self.theta * self.logit_scale  # (L,)

    def sample(self) -> Tensor:  # (L,) gates of one training forward pass
        raise NotImplementedError

    def deterministic(self) -> Tensor:  # (L,) inference gates
        raise NotImplementedError

    def penalty(self) -> Tensor:  # scalar in [0, 1]: mean "openness"
        raise NotImplementedError

    def forward(self) -> Tensor:
        """Gates for the current mode: :meth:`sample` in training, else :meth:`deterministic`."""
        return self.sample() if self.training else self.deterministic()


@register_gate("sigmoid")
class SigmoidGates(Gates):
    """``g = sigmoid(logit / temperature)``; penalty ``mean(g)``."""

    def __init__(self, n: int, init: float = 0.9, logit_scale: float = 1.0, temperature: float = 1.0, **_):
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        self.temperature = float(temperature)
        super().__init__(n, init, logit_scale)

    def init_logit(self, init: float) -> float:
        return logit(init) * self.temperature

    def deterministic(self) -> Tensor:
        return torch.sigmoid(self.logits / self.temperature)

    def sample(self) -> Tensor:
        return self.deterministic()

    def penalty(self) -> Tensor:
        return self.deterministic().mean()


@register_gate("hard_concrete")
class HardConcreteGates(Gates):
    """Hard-concrete gates (Louizos et al., ICLR 2018); ``log_alpha`` is the logit.

    ``init`` is ``sigmoid(log_alpha)`` at step 0, so the inference gate starts at
    ``clip(init · 1.2 - 0.1)`` (1.0 for ``init >= 11/12``).
    """

    gamma: float = -0.1
    zeta: float = 1.1

    def __init__(self, n: int, init: float = 0.9, logit_scale: float = 1.0, beta: float = 2.0 / 3.0, **_):
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta!r}")
        self.beta = float(beta)
        super().__init__(n, init, logit_scale)

    def _stretch(self, s: Tensor) -> Tensor:
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)

    def sample(self) -> Tensor:
        u = torch.rand_like(self.theta).clamp(1e-6, 1.0 - 1e-6)  # (L,)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.logits) / self.beta)
        return self._stretch(s)

    def deterministic(self) -> Tensor:
        return self._stretch(torch.sigmoid(self.logits))

    def penalty(self) -> Tensor:
        shift = self.beta * math.log(-self.gamma / self.zeta)
        return torch.sigmoid(self.logits - shift).mean()


def make_gates(kind: str, n: int, **kwargs: float) -> Gates:
    """Build gates of parameterisation ``kind`` (a name in :data:`GATES`)."""
    if kind not in GATES:
        raise ValueError(f"unknown gate parameterisation {kind!r}; choose one of {sorted(GATES)}")
    return GATES[kind](n, **kwargs)
