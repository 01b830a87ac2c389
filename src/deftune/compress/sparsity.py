"""Sparsity masks (keep = ``True``) for the patterns of :mod:`deftune.compress.patterns`, and the
allocation of a model-wide sparsity across layers (uniform, global, ERK).

Masks are computed from a *score* of the same shape as the weight; by default the magnitude
``|w|`` (callers may pass another score, e.g. ``|w * grad|``). Ties are broken by position, so
fraction-based masks prune exactly ``round(sparsity * count)`` entries (or blocks, or channels).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Literal

import torch
from torch import Tensor

from deftune.compress.patterns import (
    FRACTIONAL,
    NM,
    Block,
    Channel,
    PatternError,
    SparsityPattern,
    Threshold,
    Unstructured,
    parse_sparsity,
    with_sparsity,
)

Allocation = Literal["uniform", "global", "erk"]
ALLOCATIONS: tuple[str, ...] = ("uniform", "global", "erk")

MaskFn = Callable[[Tensor, SparsityPattern], Tensor]
MASK_FNS: dict[type, MaskFn] = {}


def register_mask(pattern_type: type):
    """Decorator: register the mask function of one pattern type."""

    def deco(fn: MaskFn) -> MaskFn:
        MASK_FNS[pattern_type] = fn
        return fn

    return deco


def _keep_largest(scores: Tensor, n_prune: int) -> Tensor:
    """Boolean keep-mask over a 1-D ``scores`` that drops exactly the ``n_prune`` smallest."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if n_prune > 0:
        # stable sort: among equal scores the earlier position is pruned first
        order = torch.sort(scores, stable=True).indices
        keep[order[:n_prune]] = False
    return keep


@register_mask(Unstructured)
def unstructured_mask(score: Tensor, p: Unstructured) -> Tensor:
    flat = score.reshape(-1)
    return _keep_largest(flat, round(p.sparsity * flat.numel())).reshape(score.shape)


@register_mask(Threshold)
def threshold_mask(score: Tensor, p: Threshold) -> Tensor:
    return score > p.threshold


@register_mask(NM)
def nm_mask(score: Tensor, p: NM) -> Tensor:
    p.check_shape(score.shape)
    groups = score.reshape(-1, p.m)  # (numel / m, m)
    top = torch.topk(groups, p.n, dim=1).indices  # (numel / m, n)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, top, True)
    return keep.reshape(score.shape)


@register_mask(Block)
def block_mask(score: Tensor, p: Block) -> Tensor:
    p.check_shape(score.shape)
    rows, cols = score.shape
    blocks = score.reshape(rows // p.rows, p.rows, cols // p.cols, p.cols)  # (R, r, C, c)
    norms = blocks.abs().sum(dim=(1, 3))  # (R, C): L1 norm of each block
    keep = _keep_largest(norms.reshape(-1), round(p.sparsity * norms.numel())).reshape(norms.shape)
    return keep[:, None, :, None].expand_as(blocks).reshape(rows, cols)


@register_mask(Channel)
def channel_mask(score: Tensor, p: Channel) -> Tensor:
    p.check_shape(score.shape)
    moved = score.movedim(p.axis, 0).reshape(score.shape[p.axis], -1)  # (channels, rest)
    norms = moved.float().norm(dim=1)
    keep = _keep_largest(norms, round(p.sparsity * norms.numel()))
    shape = [1] * score.dim()
    shape[p.axis] = -1
    return keep.reshape(shape).expand_as(score)


def compute_mask(weight: Tensor, pattern: SparsityPattern | str, score: Tensor | None = None) -> Tensor:
    """Keep-mask of ``weight`` under ``pattern``, ranked by ``score`` (default ``|weight|``)."""
    p = parse_sparsity(pattern) if isinstance(pattern, str) else pattern
    fn = MASK_FNS.get(type(p))
    if fn is None:
        raise PatternError(f"no mask function for {type(p).__name__}; registered: {[t.__name__ for t in MASK_FNS]}")
    s = weight.detach().abs() if score is None else score.detach()
    if s.shape != weight.shape:
        raise ValueError(f"score shape {tuple(s.shape)} differs from weight shape {tuple(weight.shape)}")
    return fn(s.float(), p).contiguous()


def sparsity_of(mask_or_weight: Tensor) -> float:
    """Fraction of zero entries (of a keep-mask: of ``False`` entries)."""
    t = mask_or_weight
    return 1.0 - float(t.count_nonzero()) / max(t.numel(), 1)


# ---- allocation across layers ----------------------------------------------------------------------


def erk_densities(shapes: Mapping[str, tuple[int, ...]], sparsity: float) -> dict[str, float]:
    """Per-layer densities of the Erdos-Renyi-Kernel rule (Evci et al. 2020, "Rigging the Lottery").

    A layer's density is proportional to ``sum(shape) / prod(shape)`` (for a Linear layer
    ``(n_in + n_out) / (n_in * n_out)``), scaled so the total number of kept weights is
    ``(1 - sparsity) * total``; layers whose density would exceed 1 are kept dense and the scale
    is solved again over the rest.
    """
    numel = {k: math.prod(s) for k, s in shapes.items()}
    raw = {k: sum(s) / numel[k] for k, s in shapes.items()}
    budget = (1.0 - sparsity) * sum(numel.values())
    dense: set[str] = set()
    while True:
        free = [k for k in shapes if k not in dense]
        remaining = budget - sum(numel[k] for k in dense)
        eps = remaining / max(sum(raw[k] * numel[k] for k in free), 1e-12)
        over = [k for k in free if eps * raw[k] > 1.0]
        if not over:
            return {k: 1.0 if k in dense else eps * raw[k] for k in shapes}
        dense.update(over)


def check_allocation(pattern: SparsityPattern, allocation: str) -> None:
    """Raise ``ValueError`` unless ``allocation`` can spread ``pattern`` over layers: ``uniform`` takes
    any pattern, ``erk`` a fraction-based one, ``global`` an unstructured one."""
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation {allocation!r} is not one of {list(ALLOCATIONS)}")
    if allocation != "uniform" and not isinstance(pattern, FRACTIONAL):
        raise ValueError(
            f"{allocation!r} allocation needs a fraction-based pattern (unstructured, block, channel), got {pattern}"
        )
    if allocation == "global" and not isinstance(pattern, Unstructured):
        raise ValueError(f"global allocation ranks single weights; it supports unstructured patterns, got {pattern}")


def allocate(
    weights: Mapping[str, Tensor], pattern: SparsityPattern | str, allocation: Allocation = "uniform"
) -> dict[str, SparsityPattern]:
    """One pattern per layer so that the model-wide sparsity matches ``pattern``'s.

    ``uniform``: every layer gets ``pattern``. ``global``: one magnitude threshold over all layers
    (unstructured patterns only); each layer gets the fraction it loses. ``erk``: per-layer
    sparsities from :func:`erk_densities` (fraction-based patterns).
    """
    p = parse_sparsity(pattern) if isinstance(pattern, str) else pattern
    check_allocation(p, allocation)
    if allocation == "uniform":
        return {name: p for name in weights}
    if allocation == "global":
        mags = torch.cat([w.detach().abs().reshape(-1).float() for w in weights.values()])
        n_prune = round(p.sparsity * mags.numel())
        if n_prune == 0:
            return {name: with_sparsity(p, 0.0) for name in weights}
        threshold = torch.kthvalue(mags, n_prune).values
        # Count per layer strictly below, then hand out the tied entries in layer order.
        below = {n: int((w.detach().abs() < threshold).sum()) for n, w in weights.items()}
        ties = {n: int((w.detach().abs() == threshold).sum()) for n, w in weights.items()}
        left = n_prune - sum(below.values())
        out = {}
        for name, w in weights.items():
            take = min(ties[name], left)
            left -= take
            out[name] = with_sparsity(p, min((below[name] + take) / w.numel(), 0.999999))
        return out
    densities = erk_densities({n: tuple(w.shape) for n, w in weights.items()}, p.sparsity)
    return {n: with_sparsity(p, min(max(1.0 - d, 0.0), 0.999999)) for n, d in densities.items()}
