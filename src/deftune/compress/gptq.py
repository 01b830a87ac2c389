"""GPTQ: Hessian-aware post-training quantization of one Linear layer.

Reimplemented from Frantar, Ashkboos, Hoefler & Alistarh, "GPTQ: Accurate Post-Training Quantization
for Generative Pre-trained Transformers" (ICLR 2023, arXiv 2210.17323), Algorithm 1.

For a layer ``W`` (out, in) with inputs ``X`` (in, N), minimise ``||W X - Q X||^2`` row by row. The
Hessian of that objective is ``H = 2 X X^T`` (shared by all rows). Columns are quantized one at a
time (optionally in order of decreasing ``diag(H)``, "act-order"); the error of column ``i`` is fed
back into the not-yet-quantized columns through the inverse Hessian (the Optimal Brain Surgeon
update), using the upper Cholesky factor ``U`` of ``H^-1``:

    err      = (w_i - q_i) / U[i, i]
    W[:, j] -= err * U[i, j]          for j > i

Updates are applied lazily in blocks of ``block_size`` columns (the paper's Step 2). Dampening adds
``damp * mean(diag(H))`` to the diagonal (Step 3). Group parameters are chosen when the first column
of a group is reached, from the already-updated weights, as in the paper; with act-order the group
parameters are fixed beforehand from the original weights ("static groups"), so each group keeps
one scale although its columns are visited out of order.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from deftune.compress.patterns import QuantPattern
from deftune.compress.quant import QuantParams, choose_qparams


@dataclass(frozen=True)
class GPTQOptions:
    """Options of :func:`gptq_quantize`.

    Attributes:
        block_size: columns per lazy-update block (rounded up to a multiple of the group size).
        damp: relative dampening added to ``diag(H)``.
        act_order: quantize columns in order of decreasing ``diag(H)``.
    """

    block_size: int = 128
    damp: float = 0.01
    act_order: bool = False

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if not (0.0 <= self.damp < 1.0):
            raise ValueError(f"damp must be in [0, 1), got {self.damp}")


def _upper_cholesky_of_inverse(h: Tensor, damp: float) -> Tensor:
    h = h.double().clone()
    dead = torch.diag(h) == 0  # inputs never active on the calibration data
    h[dead, dead] = 1.0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    h_inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(h_inv, upper=True)


@torch.no_grad()
def gptq_quantize(
    weight: Tensor, hessian: Tensor, pattern: QuantPattern, options: GPTQOptions = GPTQOptions()
) -> tuple[Tensor, QuantParams]:
    """GPTQ-quantize ``weight`` (out, in) given ``hessian`` (in, in) ~ ``X X^T``.

    Returns the dequantized weight (float32, on the quantization grid of the returned parameters,
    so that ``fake_quantize(Q, params) == Q``) and the parameters.
    """
    if weight.dim() != 2:
        raise ValueError(f"GPTQ quantizes 2-D Linear weights, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"Hessian shape {tuple(hessian.shape)} does not match {cols} input features")
    p = pattern
    if p.granularity == "channel" and p.axis == 1:
        dynamic, width = replace(p, granularity="tensor"), 1  # one scale per column
    elif p.granularity == "group" and not options.act_order:
        dynamic, width = replace(p, granularity="channel", axis=0, group_size=0), p.group_size
    else:
        dynamic, width = None, 0  # tensor, per-row, or static groups: fixed from the original weights

    w = weight.detach().float().clone()
    perm = torch.argsort(torch.diag(hessian), descending=True) if options.act_order else None
    scale = torch.empty_like(w)
    zero = torch.empty_like(w)
    if dynamic is None:
        static = choose_qparams(w, p)
        scale, zero = static.expand(static.scale).clone(), static.expand(static.zero_point).clone()
    h = hessian
    if perm is not None:
        w, h = w[:, perm], hessian[perm][:, perm]
        scale, zero = scale[:, perm], zero[:, perm]
    u = _upper_cholesky_of_inverse(h, options.damp).float()  # (in, in), upper triangular

    block = options.block_size
    if width > 1:
        block = -(-block // width) * width  # a group never straddles two blocks
    codes = torch.empty_like(w)
    for b0 in range(0, cols, block):
        b1 = min(b0 + block, cols)
        w1 = w[:, b0:b1].clone()  # (out, B) updated in place column by column
        err1 = torch.zeros_like(w1)
        u1 = u[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            if dynamic is not None and col % width == 0:
                params = choose_qparams(w1[:, i : i + width], dynamic)  # from the updated weights
                scale[:, col : col + width] = params.expand(params.scale)
                zero[:, col : col + width] = params.expand(params.zero_point)
            s, z = scale[:, col], zero[:, col]
            q = torch.clamp(torch.round(w1[:, i] / s) + z, p.qmin, p.qmax)  # (out,)
            codes[:, col] = q
            e = (w1[:, i] - (q - z) * s) / u1[i, i]
            w1[:, i:] -= e[:, None] * u1[i, i:][None, :]  # error feedback inside the block
            err1[:, i] = e
        w[:, b1:] -= err1 @ u[b0:b1, b1:]  # lazy batch update of the later columns
    if perm is not None:
        inv = torch.argsort(perm)
        codes, scale, zero = codes[:, inv], scale[:, inv], zero[:, inv]
    params = QuantParams.from_full(scale, zero, p)
    dequant = (codes - zero) * scale  # same float32 expression as quant.dequantize
    return dequant, params
