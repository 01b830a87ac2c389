"""Integer quantization at 2-8 bits: choose parameters, quantize, dequantize, fake-quantize.

Every granularity is handled by one canonical view: the tensor is reshaped to a ``(G, L)`` matrix
whose rows are the quantization groups, so that the parameters are ``(G, 1)`` columns:

* ``tensor``: ``(1, numel)``;
* ``channel`` along ``axis``: ``(shape[axis], numel / shape[axis])``;
* ``group`` of ``g``: ``(numel / g, g)`` — consecutive runs of ``g`` elements of the last dim.

Symmetric: ``scale = absmax / (2^(b-1) - 1)`` (the step; the issue's ``(2^(b-1)-1)/absmax`` is its
inverse), ``q = clamp(round(w / scale), -(2^(b-1)-1), 2^(b-1)-1)``, zero maps to zero.
Asymmetric: the range ``[min(lo, 0), max(hi, 0)]`` is mapped onto ``[0, 2^b - 1]`` with
``scale = (hi - lo) / (2^b - 1)``, ``zero_point = round(-lo / scale)``, and
``q = clamp(round(w / scale) + zero_point, 0, 2^b - 1)``; zero is still exactly representable.
Dequantization is ``(q - zero_point) * scale`` in float32, the same expression for fake-quantized,
packed (:mod:`deftune.compress.packed`) and GPTQ weights, so they agree bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from deftune.compress.patterns import QuantPattern, parse_quant

MSE_GRID = 40  # shrink factors tried by clip="mse"
MSE_MAX_SHRINK = 0.8  # smallest factor tried is 1 - MSE_MAX_SHRINK


# ---- canonical (G, L) view -------------------------------------------------------------------------


def group_view(w: Tensor, pattern: QuantPattern) -> Tensor:
    """``w`` as a ``(G, L)`` matrix whose rows are the quantization groups of ``pattern``."""
    if pattern.granularity == "tensor":
        return w.reshape(1, -1)
    pattern.check_shape(w.shape)
    if pattern.granularity == "channel":
        return w.movedim(pattern.axis, 0).reshape(w.shape[pattern.axis], -1)
    return w.reshape(-1, pattern.group_size)


def ungroup_view(v: Tensor, pattern: QuantPattern, shape: torch.Size) -> Tensor:
    """Inverse of :func:`group_view`."""
    if pattern.granularity == "channel":
        moved = (shape[pattern.axis], *[s for i, s in enumerate(shape) if i != pattern.axis])
        return v.reshape(moved).movedim(0, pattern.axis)
    return v.reshape(shape)


# ---- parameters ------------------------------------------------------------------------------------


@dataclass
class QuantParams:
    """Scale and zero-point of every group, ``(G, 1)`` float32 columns of the canonical view.

    ``zero_point`` holds integers (stored as float32) and is all zero for symmetric patterns.
    """

    scale: Tensor
    zero_point: Tensor
    pattern: QuantPattern
    shape: torch.Size

    def expand(self, t: Tensor) -> Tensor:
        """A ``(G, 1)`` parameter broadcast to the full tensor shape."""
        g = group_view(torch.empty(self.shape, device="meta"), self.pattern).shape
        return ungroup_view(t.expand(g), self.pattern, self.shape)

    def to(self, device: torch.device | str) -> QuantParams:
        return QuantParams(self.scale.to(device), self.zero_point.to(device), self.pattern, self.shape)

    @classmethod
    def from_full(cls, scale: Tensor, zero_point: Tensor, pattern: QuantPattern) -> QuantParams:
        """Parameters from full-shape tensors that are constant within each group (GPTQ builds these)."""
        s = group_view(scale, pattern)[:, :1].float().contiguous()
        z = group_view(zero_point, pattern)[:, :1].float().contiguous()
        return cls(s, z, pattern, scale.shape)


def _params_from_range(lo: Tensor, hi: Tensor, p: QuantPattern) -> tuple[Tensor, Tensor]:
    if p.symmetric:
        scale = torch.maximum(hi, -lo) / p.qmax
        zero = torch.zeros_like(scale)
    else:
        scale = (hi - lo) / (p.qmax - p.qmin)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group: any scale works
    if not p.symmetric:
        zero = torch.clamp(torch.round(p.qmin - lo / scale), p.qmin, p.qmax)
    return scale, zero


def _fake_view(v: Tensor, scale: Tensor, zero: Tensor, p: QuantPattern) -> Tensor:
    q = torch.clamp(torch.round(v / scale) + zero, p.qmin, p.qmax)
    return (q - zero) * scale


def row_quantile(v: Tensor, q: float) -> Tensor:
    """``torch.quantile(v, q, dim=1, keepdim=True)`` (linear interpolation) for ``v`` of any size.

    ``torch.quantile`` refuses inputs above 2^24 elements (a 4096 x 4097 weight, per tensor); this
    sorts each row instead. ``v`` (G, L) -> (G, 1).
    """
    ordered = v.sort(dim=1).values  # (G, L)
    pos = q * (v.shape[1] - 1)
    below, frac = int(pos), pos - int(pos)
    above = min(below + 1, v.shape[1] - 1)
    return torch.lerp(ordered[:, below : below + 1], ordered[:, above : above + 1], frac)


def _range(v: Tensor, p: QuantPattern) -> tuple[Tensor, Tensor]:
    """Per-row ``(lo, hi)`` with ``lo <= 0 <= hi``, clipped at the percentile if asked."""
    if p.clip == "percentile":
        q = p.percentile / 100.0
        if p.symmetric:
            hi = row_quantile(v.abs(), q)
            return -hi, hi
        lo = row_quantile(v, 1.0 - q)
        hi = row_quantile(v, q)
    else:
        lo, hi = v.amin(dim=1, keepdim=True), v.amax(dim=1, keepdim=True)
    return lo.clamp(max=0.0), hi.clamp(min=0.0)


def choose_qparams(w: Tensor, pattern: QuantPattern | str) -> QuantParams:
    """Scale and zero-point of every group of ``w`` for ``pattern`` (with its clipping rule)."""
    p = parse_quant(pattern) if isinstance(pattern, str) else pattern
    v = group_view(w.detach().float(), p)  # (G, L)
    lo, hi = _range(v, p)
    scale, zero = _params_from_range(lo, hi, p)
    if p.clip == "mse":
        # Shrink the range by a factor per group; keep the factor of least squared error.
        best = ((v - _fake_view(v, scale, zero, p)) ** 2).sum(dim=1, keepdim=True)
        for i in range(1, MSE_GRID):
            f = 1.0 - MSE_MAX_SHRINK * i / MSE_GRID
            s, z = _params_from_range(lo * f, hi * f, p)
            err = ((v - _fake_view(v, s, z, p)) ** 2).sum(dim=1, keepdim=True)
            better = err < best
            best = torch.where(better, err, best)
            scale, zero = torch.where(better, s, scale), torch.where(better, z, zero)
    return QuantParams(scale, zero, p, w.shape)


# ---- quantize / dequantize -------------------------------------------------------------------------


def quantize(w: Tensor, params: QuantParams) -> Tensor:
    """Integer codes of ``w`` (int8 for symmetric, uint8 for asymmetric patterns), shape of ``w``."""
    p = params.pattern
    if tuple(w.shape) != tuple(params.shape):
        raise ValueError(f"tensor shape {tuple(w.shape)} differs from the parameters' {tuple(params.shape)}")
    v = group_view(w.detach().float(), p)
    q = torch.clamp(torch.round(v / params.scale) + params.zero_point, p.qmin, p.qmax)
    return ungroup_view(q, p, w.shape).to(torch.int8 if p.symmetric else torch.uint8)


def dequantize(q: Tensor, params: QuantParams) -> Tensor:
    """Float32 values ``(q - zero_point) * scale`` of integer codes ``q``."""
    v = group_view(q.float(), params.pattern)
    return ungroup_view((v - params.zero_point) * params.scale, params.pattern, params.shape)


def fake_quantize(w: Tensor, pattern: QuantPattern | str | QuantParams) -> Tensor:
    """``dequantize(quantize(w))`` in ``w``'s dtype (parameters chosen from ``w`` unless given).

    Not differentiable by itself (rounding); wrap it in :func:`deftune.compress.ste.ste` to train.
    """
    params = pattern if isinstance(pattern, QuantParams) else choose_qparams(w, pattern)
    v = group_view(w.detach().float(), params.pattern)
    out = _fake_view(v, params.scale, params.zero_point, params.pattern)
    return ungroup_view(out, params.pattern, w.shape).to(w.dtype)
