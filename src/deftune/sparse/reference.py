"""Pure-PyTorch reference of the activation-sparse MLP operator.

This is at once the CPU fallback, the test oracle of the Triton kernels
(:mod:`deftune.sparse.triton_mlp`) and the baseline of ``benchmarks/sparse_mlp.py``.

Semantics (CATS, Lee et al. 2024, arXiv 2404.08763; TEAL, Liu et al. 2024, arXiv 2408.14690): an
activation ``a`` with ``|a| <= t`` is set to zero, everything else is the ordinary MLP.

* gated (LLaMA)::

      a = act(x W_gate^T + b_gate)            # (M, I)
      a = a * (|a| > t)
      y = (a * (x W_up^T + b_up)) W_down^T + b_down

* non-gated (BERT, GPT-2, OPT)::

      a = act(x W_up^T + b_up) * (|act(.)| > t)
      y = a W_down^T + b_down

Weight layouts (chosen for the kernels, see ``docs/sparse.md``): every matrix is stored as
``(I, H)`` row-major, so an active neuron ``i`` reads one contiguous ``H``-vector of each matrix.
``W_gate`` and ``W_up`` are ``nn.Linear`` weights as they are; ``W_down`` is stored transposed
(``w_down_t = down_proj.weight.T``, ``(I, H)``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

#: Activations the kernels implement, by name (the reference uses the same functions).
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "identity": lambda t: t,
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "relu": F.relu,
}

Activation = str | Callable[[Tensor], Tensor]


def resolve_activation(activation: Activation) -> Callable[[Tensor], Tensor]:
    """The callable for ``activation`` (a name in :data:`ACTIVATIONS` or a callable)."""
    if callable(activation):
        return activation
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"activation={activation!r} is not one of {sorted(ACTIVATIONS)} (or pass a callable)"
        )
    return ACTIVATIONS[activation]


def _check_matrix(name: str, w: Tensor, shape: tuple[int, int] | None = None) -> None:
    if w.dim() != 2:
        raise ValueError(f"{name} must be 2-D (I, H); got shape {tuple(w.shape)}")
    if shape is not None and tuple(w.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(w.shape)}; expected {shape} (all matrices are (I, H))")


def _check_vector(name: str, b: Tensor | None, size: int) -> None:
    if b is not None and tuple(b.shape) != (size,):
        raise ValueError(f"{name} has shape {tuple(b.shape)}; expected ({size},)")


@dataclass(frozen=True)
class GatedMLPWeights:
    """Weights of a gated MLP in the sparse-operator layout; all matrices ``(I, H)``."""

    w_gate: Tensor  # (I, H) = gate_proj.weight
    w_up: Tensor  # (I, H) = up_proj.weight
    w_down_t: Tensor  # (I, H) = down_proj.weight.T
    b_gate: Tensor | None = None  # (I,)
    b_up: Tensor | None = None  # (I,)
    b_down: Tensor | None = None  # (H,)

    def __post_init__(self) -> None:
        _check_matrix("w_gate", self.w_gate)
        shape = tuple(self.w_gate.shape)
        _check_matrix("w_up", self.w_up, shape)
        _check_matrix("w_down_t", self.w_down_t, shape)
        _check_vector("b_gate", self.b_gate, shape[0])
        _check_vector("b_up", self.b_up, shape[0])
        _check_vector("b_down", self.b_down, shape[1])

    @property
    def intermediate(self) -> int:
        return self.w_gate.shape[0]

    @property
    def hidden(self) -> int:
        return self.w_gate.shape[1]

    @classmethod
    def from_linears(
        cls, gate: torch.nn.Linear, up: torch.nn.Linear, down: torch.nn.Linear
    ) -> GatedMLPWeights:
        """Build from ``nn.Linear`` layers (copies ``down.weight`` into its transposed layout)."""
        return cls(gate.weight, up.weight, down.weight.t().contiguous(), gate.bias, up.bias, down.bias)


@dataclass(frozen=True)
class MLPWeights:
    """Weights of a non-gated MLP in the sparse-operator layout; both matrices ``(I, H)``."""

    w_up: Tensor  # (I, H) = up / fc1 weight
    w_down_t: Tensor  # (I, H) = down / fc2 weight, transposed
    b_up: Tensor | None = None  # (I,)
    b_down: Tensor | None = None  # (H,)

    def __post_init__(self) -> None:
        _check_matrix("w_up", self.w_up)
        shape = tuple(self.w_up.shape)
        _check_matrix("w_down_t", self.w_down_t, shape)
        _check_vector("b_up", self.b_up, shape[0])
        _check_vector("b_down", self.b_down, shape[1])

    @property
    def intermediate(self) -> int:
        return self.w_up.shape[0]

    @property
    def hidden(self) -> int:
        return self.w_up.shape[1]


def threshold_activation(a: Tensor, threshold: float) -> Tensor:
    """``a`` with every entry of ``|a| <= threshold`` set to zero.

    The comparison runs in float32 for half-precision ``a`` (the threshold is a float32 value), as
    calibration and the Triton kernels compare: in bf16 the threshold itself would be rounded.
    """
    keep = (a.float().abs() if a.dtype in (torch.float16, torch.bfloat16) else a.abs()) > threshold
    return torch.where(keep, a, torch.zeros((), dtype=a.dtype, device=a.device))


def down_proj_reference(a: Tensor, w_down_t: Tensor, b_down: Tensor | None = None) -> Tensor:
    """``a W_down^T + b_down`` with ``w_down_t`` ``(I, H)``: ``(..., I) -> (..., H)``."""
    y = a @ w_down_t
    return y if b_down is None else y + b_down


def gated_mlp_reference(
    x: Tensor, weights: GatedMLPWeights, threshold: float, activation: Activation = "silu"
) -> Tensor:
    """Gated MLP with thresholded activated gate: ``(..., H) -> (..., H)``, computed in ``x.dtype``."""
    act = resolve_activation(activation)
    a = threshold_activation(act(F.linear(x, weights.w_gate, weights.b_gate)), threshold)  # (..., I)
    h = a * F.linear(x, weights.w_up, weights.b_up)  # (..., I)
    return down_proj_reference(h, weights.w_down_t, weights.b_down)


def mlp_reference(
    x: Tensor, weights: MLPWeights, threshold: float, activation: Activation = "gelu"
) -> Tensor:
    """Non-gated MLP with thresholded activation: ``(..., H) -> (..., H)``, computed in ``x.dtype``."""
    act = resolve_activation(activation)
    a = threshold_activation(act(F.linear(x, weights.w_up, weights.b_up)), threshold)  # (..., I)
    return down_proj_reference(a, weights.w_down_t, weights.b_down)
