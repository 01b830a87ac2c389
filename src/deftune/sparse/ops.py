"""The activation-sparse MLP operator: Triton on CUDA, the PyTorch reference otherwise.

Three functions, one per MLP kind, all ``(..., H) -> (..., H)`` (``(..., I) -> (..., H)`` for
the down projection alone) and all numerically the reference of :mod:`deftune.sparse.reference`:

* :func:`sparse_gated_mlp` — LLaMA-style ``down((act(gate x) * mask) * up x)``;
* :func:`sparse_mlp` — BERT / GPT-2 / OPT ``down(act(up x) * mask)``;
* :func:`sparse_down_proj` — ``a W_down^T + b`` reading only the rows of ``W_down^T`` whose
  input column is non-zero in some row of ``a``.

Which backend runs is set by :class:`SparseMLPConfig` (``backend="auto"``: Triton when the input
is a CUDA fp16/bf16 tensor of at most 16 rows, no gradient is needed and Triton imports; else the
reference). ``backend="triton"`` never falls back: an unsupported case raises
``NotImplementedError`` naming the limit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from deftune.sparse import triton_mlp
from deftune.sparse.reference import (
    ACTIVATIONS,
    Activation,
    GatedMLPWeights,
    MLPWeights,
    down_proj_reference,
    gated_mlp_reference,
    mlp_reference,
    resolve_activation,
)
from deftune.sparse.triton_mlp import KernelConfig

BACKENDS: tuple[str, ...] = ("auto", "triton", "reference")
SCHEMES: tuple[str, ...] = ("auto",) + triton_mlp.SCHEMES
GATES: tuple[str, ...] = ("auto",) + triton_mlp.GATE_MODES


@dataclass(frozen=True)
class SparseMLPConfig:
    """How the sparse operator runs.

    Attributes:
        backend: ``"auto"`` (Triton where supported, else the reference), ``"triton"`` (raise
            ``NotImplementedError`` where unsupported) or ``"reference"``.
        scheme: rows 2..16: ``"union"`` (read each weight row active in any row once) or
            ``"per_row"`` (one active list per row); ``"auto"`` picks the measured winner.
        gate: who computes the dense gate / up projection: ``"triton"`` (fused with the
            threshold and compaction), ``"cublas"`` (``F.linear`` then the fused kernel) or
            ``"auto"`` (the measured winner per row count).
        kernel: block sizes; ``None`` uses :func:`deftune.sparse.triton_mlp.default_config`.
    """

    backend: str = "auto"
    scheme: str = "auto"
    gate: str = "auto"
    kernel: KernelConfig | None = None

    def __post_init__(self) -> None:
        for name, accepted in (("backend", BACKENDS), ("scheme", SCHEMES), ("gate", GATES)):
            value = getattr(self, name)
            if value not in accepted:
                raise ValueError(f"SparseMLPConfig.{name}={value!r} is not one of {accepted}")


DEFAULT_CONFIG = SparseMLPConfig()

# Measured on an H100 (benchmarks/NOTES_sparse.md, docs/benchmarks.md): the union scheme reads
# each active weight row once and beat one list per row at every batch size tried; the fused
# Triton gate (GEMV + threshold + compaction + up) beat cuBLAS + the fused pass once tuned.
AUTO_SCHEME = "union"
AUTO_GATE_BY_ROWS: dict[int, str] = {}
AUTO_GATE_DEFAULT = "triton"


def _needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def use_triton(x: Tensor, config: SparseMLPConfig, *params: Tensor | None) -> bool:
    """Whether the Triton kernels will run for input ``x`` (``(..., H)``) and these weights.

    Raises:
        NotImplementedError: ``config.backend == "triton"`` and the case is unsupported.
    """
    if config.backend == "reference":
        return False
    x2d = x.reshape(-1, x.shape[-1])
    try:
        if _needs_grad(x, *params):
            raise NotImplementedError(
                "the Triton sparse MLP is inference-only (no backward); run under torch.no_grad() or use "
                "backend='reference'"
            )
        triton_mlp.check_supported(x2d, *[p for p in params if p is not None and p.dim() == 2])
    except NotImplementedError:
        if config.backend == "triton":
            raise
        return False
    return True


def _scheme(config: SparseMLPConfig) -> str:
    return AUTO_SCHEME if config.scheme == "auto" else config.scheme


def _gate(config: SparseMLPConfig, rows: int) -> str:
    return AUTO_GATE_BY_ROWS.get(rows, AUTO_GATE_DEFAULT) if config.gate == "auto" else config.gate


def _kernel_activation(
    x2d: Tensor, w: Tensor, b: Tensor | None, activation: Activation
) -> tuple[str, Tensor | None]:
    """A kernel activation name, and the precomputed activated gate for a callable without one."""
    if isinstance(activation, str):
        resolve_activation(activation)  # validates the name
        return activation, None
    return "identity", activation(F.linear(x2d, w, b))  # (M, I) by cuBLAS + the module's own act


def _finish(y2d: Tensor, shape: torch.Size, out: Tensor | None) -> Tensor:
    y = y2d.reshape(*shape[:-1], y2d.shape[-1])
    if out is not None and y.data_ptr() != out.data_ptr():
        out.copy_(y)
        return out
    return y


def _out2d(out: Tensor | None, hidden: int) -> Tensor | None:
    return None if out is None else out.view(-1, hidden)


def sparse_gated_mlp(
    x: Tensor,
    weights: GatedMLPWeights,
    threshold: float,
    activation: Activation = "silu",
    config: SparseMLPConfig = DEFAULT_CONFIG,
    out: Tensor | None = None,
) -> Tensor:
    """Gated MLP whose activated gate is zeroed where ``|a| <= threshold``: ``(..., H) -> (..., H)``.

    Only the rows of ``W_up`` and ``W_down_t`` of active neurons are read on the Triton path.
    ``out`` (same shape as ``x``) is filled when given.
    """
    w = weights
    if not use_triton(x, config, w.w_gate, w.w_up, w.w_down_t, w.b_gate, w.b_up, w.b_down):
        return _finish(gated_mlp_reference(x, w, threshold, activation), x.shape, out)
    return _launch(x, w.w_gate, w.b_gate, w.w_up, w.b_up, w.w_down_t, w.b_down, threshold, activation, config, out)


def sparse_mlp(
    x: Tensor,
    weights: MLPWeights,
    threshold: float,
    activation: Activation = "gelu",
    config: SparseMLPConfig = DEFAULT_CONFIG,
    out: Tensor | None = None,
) -> Tensor:
    """Non-gated MLP whose activation is zeroed where ``|a| <= threshold``: ``(..., H) -> (..., H)``."""
    w = weights
    if not use_triton(x, config, w.w_up, w.w_down_t, w.b_up, w.b_down):
        return _finish(mlp_reference(x, w, threshold, activation), x.shape, out)
    return _launch(x, w.w_up, w.b_up, None, None, w.w_down_t, w.b_down, threshold, activation, config, out)


def _launch(
    x: Tensor,
    w_act: Tensor,
    b_act: Tensor | None,
    w_up: Tensor | None,
    b_up: Tensor | None,
    w_down_t: Tensor,
    b_down: Tensor | None,
    threshold: float,
    activation: Activation,
    config: SparseMLPConfig,
    out: Tensor | None,
) -> Tensor:
    """The Triton path of both MLP kinds: ``w_act`` ``(I, H)`` feeds the activation (the gate, or
    the up projection of a non-gated MLP); ``w_up`` is the gated MLP's up projection (None: non-gated)."""
    hidden = w_act.shape[1]
    x2d = x.reshape(-1, hidden)  # (M, H)
    act, gate_values = _kernel_activation(x2d, w_act, b_act, activation)
    y2d = triton_mlp.launch_sparse_mlp(
        x2d,
        w_gate=w_act,
        w_up=w_up,
        w_down_t=w_down_t,
        b_gate=b_act,
        b_up=b_up,
        b_down=b_down,
        threshold=threshold,
        activation=act,
        gate_values=gate_values,
        scheme=_scheme(config),
        gate=_gate(config, x2d.shape[0]),
        config=config.kernel,
        out=_out2d(out, hidden),
    )
    return _finish(y2d, x.shape, out)


def sparse_down_proj(
    a: Tensor,
    w_down_t: Tensor,
    b_down: Tensor | None = None,
    config: SparseMLPConfig = DEFAULT_CONFIG,
    out: Tensor | None = None,
) -> Tensor:
    """``a W_down^T + b_down`` for ``a`` ``(..., I)`` and ``w_down_t`` ``(I, H)``, skipping zero inputs.

    On the Triton path a row ``i`` of ``w_down_t`` is read only if ``a[..., i]`` is non-zero in
    some row (union scheme) — e.g. after :func:`deftune.sparse.reference.threshold_activation`.
    """
    if w_down_t.dim() != 2 or a.shape[-1] != w_down_t.shape[0]:
        raise ValueError(f"a (..., {a.shape[-1]}) does not match w_down_t {tuple(w_down_t.shape)} (I, H)")
    if not use_triton(a, config, w_down_t, b_down):
        return _finish(down_proj_reference(a, w_down_t, b_down), a.shape, out)
    a2d = a.reshape(-1, a.shape[-1])
    y2d = triton_mlp.launch_sparse_mlp(
        a2d.new_empty(a2d.shape[0], w_down_t.shape[1]),  # x is not read: the gate comes from memory
        w_gate=w_down_t,
        w_down_t=w_down_t,
        b_down=b_down,
        threshold=0.0,
        activation="identity",
        gate_values=a2d if a2d.stride(-1) == 1 else a2d.contiguous(),
        scheme=_scheme(config),
        config=config.kernel,
        out=_out2d(out, w_down_t.shape[1]),
    )
    return _finish(y2d, a.shape, out)


__all__ = [
    "ACTIVATIONS",
    "BACKENDS",
    "DEFAULT_CONFIG",
    "SparseMLPConfig",
    "sparse_down_proj",
    "sparse_gated_mlp",
    "sparse_mlp",
    "use_triton",
]
