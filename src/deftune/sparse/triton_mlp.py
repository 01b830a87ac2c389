"""Triton kernels of the activation-sparse MLP (inference only), and their launcher.

Importing this module never needs Triton or a GPU: the kernels are defined only when ``triton``
imports, and :func:`launch_sparse_mlp` raises ``NotImplementedError`` without it.

Pipeline for ``M <= 16`` rows (decoding), all matrices ``(I, H)`` row-major (see
``docs/sparse.md`` for why; the reference is :mod:`deftune.sparse.reference`)::

    memset   cnt = 0
    gate     program p owns neurons [p*BI, (p+1)*BI):
               g = x W_gate[p]^T (+b)   (or read g from a cuBLAS GEMV: gate="cublas")
               a = act(g); active = |a| > t
               [fused up]  u = x W_up[i]^T for the neurons active in any row; h = a * u
               slot = atomic_add(cnt, #active) + cumsum(active) - 1    # block compaction
               idx[slot] = i; h_buf[m, slot] = h
    [up]     (not fused) h_buf[m, k] *= x_m . W_up[idx[k]]  over the compact list
    down     program (hb, s) owns columns [hb*BH, ...) and the s-th slice of the list:
               part[s, m, cols] = sum_k h_buf[m, k] * W_down_t[idx[k], cols]
    reduce   y[m, :] = sum_s part[s, m, :] (+b_down), cast to the input dtype

The compact list lives on the device and its length is never read back by the host, so the whole
operator can be captured in a CUDA graph. Only the ``n`` active rows of ``W_up`` and ``W_down_t``
are read (one contiguous ``H``-vector each); ``W_gate`` is read densely.

Rows: ``scheme="union"`` builds one list of the neurons active in *any* row and reads each such
weight row once for all rows (tensor-core ``tl.dot`` over a 16-row padded tile);
``scheme="per_row"`` builds one list per row (the batch-1 kernels on a grid axis of rows).

The order of the list depends on which program reaches the atomic counter first, so the fp32
summation order of ``down`` (and hence the last bit of the output) can vary between runs.

Kernel design follows the descriptions in TEAL (arXiv 2408.14690), CATS (arXiv 2404.08763),
Deja Vu (arXiv 2310.17157) and ProSparse (arXiv 2402.13516); no code was taken from them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # Triton is optional: the package imports (and the reference runs) without it.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    HAS_TRITON = False

#: Activation ids understood by the kernels (names as in ``reference.ACTIVATIONS``).
ACT_IDS: dict[str, int] = {"identity": 0, "silu": 1, "gelu": 2, "gelu_tanh": 3, "relu": 4}
MAX_ROWS = 16  # rows handled by one tensor-core tile in the union scheme
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
SCHEMES = ("union", "per_row")
_INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter (tests only)
GATE_MODES = ("triton", "cublas")


@dataclass(frozen=True)
class KernelConfig:
    """Block sizes and launch parameters of the kernels (see :func:`default_config`)."""

    gate_block_i: int = 16  # neurons per gate program
    gate_block_h: int = 256  # hidden chunk of the gate / fused-up loop
    gate_warps: int = 4
    gate_stages: int = 3
    gate_evict: bool = False  # stream gate / fused-up weights with evict_first (GEMV path)
    fuse_up: bool = True  # compute the up projection inside the gate kernel
    up_block_k: int = 16  # (unfused up) active neurons per program
    up_block_h: int = 256
    up_warps: int = 4
    down_block_k: int = 32  # active neurons per loop step of the down kernel
    down_block_h: int = 128  # output columns per down program
    down_warps: int = 4
    down_stages: int = 3
    down_split: int = 0  # slices of the active list (0: chosen from the SM count)

    def __post_init__(self) -> None:
        for name in (
            "gate_block_i",
            "gate_block_h",
            "up_block_k",
            "up_block_h",
            "down_block_k",
            "down_block_h",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1 or value & (value - 1):
                raise ValueError(f"KernelConfig.{name}={value} must be a power of two")


@lru_cache(maxsize=8)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# Generic block sizes per row bucket ("b1": one row, FMA GEMV; "bn": 2..16 rows, tensor-core
# tiles, >= 16 along every axis), measured on an H100 at 4096x14336 (benchmarks/NOTES_sparse.md).
GENERIC_CONFIGS: dict[str, KernelConfig] = {
    "b1": KernelConfig(gate_block_i=8, gate_block_h=512, gate_warps=8, gate_stages=2, gate_evict=True, down_block_k=64),
    "bn": KernelConfig(gate_block_i=64, gate_block_h=128, gate_warps=4, gate_stages=3, down_block_k=64),
}
#: Per-shape configurations found by ``benchmarks/sparse_mlp.py --tune``: (bucket, H, I) -> config.
TUNED_CONFIGS: dict[tuple[str, int, int], KernelConfig] = {
    # H100, bf16 (docs/results/sparse_tune_h100.json): long rows (BH=2048), few neurons per
    # program (BI=4) and evict_first weight loads bring the gate GEMV to cuBLAS's bandwidth
    ("b1", 4096, 14336): KernelConfig(
        gate_block_i=4, gate_block_h=2048, gate_warps=4, gate_stages=2, gate_evict=True,
        down_block_k=128, down_block_h=64, down_split=8,
    ),
}


def rows_bucket(rows: int) -> str:
    return "b1" if rows == 1 else "bn"


def default_config(rows: int, hidden: int, intermediate: int) -> KernelConfig:
    """The tuned configuration of this shape if there is one, else the generic one of the row bucket."""
    bucket = rows_bucket(rows)
    return TUNED_CONFIGS.get((bucket, hidden, intermediate), GENERIC_CONFIGS[bucket])


def register_tuned_config(bucket: str, hidden: int, intermediate: int, config: KernelConfig) -> None:
    """Use ``config`` for ``(hidden, intermediate)`` in row bucket ``"b1"`` or ``"bn"``."""
    if bucket not in GENERIC_CONFIGS:
        raise ValueError(f"bucket={bucket!r} is not one of {sorted(GENERIC_CONFIGS)}")
    TUNED_CONFIGS[(bucket, hidden, intermediate)] = config


def load_tuned_configs(path: str) -> int:
    """Register the configurations of a ``--tune`` results file; returns how many."""
    import json

    with open(path, encoding="utf-8") as f:
        entries = json.load(f)["configs"]
    for e in entries:
        register_tuned_config(e["bucket"], e["hidden"], e["inter"], KernelConfig(**e["config"]))
    return len(entries)


def _split_for(requested: int, device: torch.device, programs: int, max_tiles: int) -> int:
    """Slices of the active list for the down kernel: about 4 programs per SM in all."""
    if requested > 0:
        return requested
    sms = (
        _sm_count(device.index if device.index is not None else torch.cuda.current_device())
        if device.type == "cuda"
        else 132
    )
    return max(1, min(64, max_tiles, (4 * sms) // max(1, programs)))


if HAS_TRITON:

    @triton.jit
    def _act(g, ACT: tl.constexpr):
        # g: fp32. Ids as in ACT_IDS.
        if ACT == 1:  # silu(g) = g * sigmoid(g)
            out = g * tl.sigmoid(g)
        elif ACT == 2:  # gelu(g) = g/2 (1 + erf(g / sqrt 2))
            out = 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476))
        elif ACT == 3:  # tanh approximation, tanh(z) = 2 sigmoid(2z) - 1
            z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
            out = g * tl.sigmoid(2.0 * z)  # = g/2 (1 + tanh z)
        elif ACT == 4:
            out = tl.maximum(g, 0.0)
        else:
            out = g
        return out

    @triton.jit
    def _rows_dot(
        x_ptr,
        stride_xm,
        w_ptr,
        mask_m,
        rows_w,
        mask_w,
        H,
        BLOCK_M: tl.constexpr,
        BLOCK_W: tl.constexpr,
        BLOCK_H: tl.constexpr,
        USE_DOT: tl.constexpr,
        EVEN_H: tl.constexpr = False,
        EVICT: tl.constexpr = False,
    ):
        """acc[m, j] = sum_h x[m, h] * w[rows_w[j], h] in fp32, weight rows masked by mask_w.

        x_ptr points at the first row of the row block; mask_m (BLOCK_M,) masks rows of x.
        Returns (BLOCK_M, BLOCK_W). USE_DOT=False needs BLOCK_M == 1 (a GEMV with FMAs); there
        EVEN_H (H % BLOCK_H == 0) drops the column masks and EVICT streams the weights past L2
        (``evict_first``: each weight is read once).
        """
        offs_h0 = tl.arange(0, BLOCK_H)
        if USE_DOT:
            offs_m = tl.arange(0, BLOCK_M)
            acc = tl.zeros([BLOCK_M, BLOCK_W], dtype=tl.float32)
            for h0 in range(0, H, BLOCK_H):
                offs_h = h0 + offs_h0
                mh = offs_h < H
                xt = tl.load(
                    x_ptr + offs_m[:, None] * stride_xm + offs_h[None, :],
                    mask=mask_m[:, None] & mh[None, :],
                    other=0.0,
                )  # (BM, BH)
                wt = tl.load(
                    w_ptr + rows_w[:, None] * H + offs_h[None, :],
                    mask=mask_w[:, None] & mh[None, :],
                    other=0.0,
                )  # (BW, BH)
                acc = tl.dot(xt, tl.trans(wt), acc)  # (BM, BW)
        else:
            acc2 = tl.zeros([BLOCK_W, BLOCK_H], dtype=tl.float32)
            for h0 in range(0, H, BLOCK_H):
                offs_h = h0 + offs_h0
                if EVEN_H:
                    xt = tl.load(x_ptr + offs_h).to(tl.float32)  # (BH,)
                    wmask = mask_w[:, None]
                else:
                    mh = offs_h < H
                    xt = tl.load(x_ptr + offs_h, mask=mh, other=0.0).to(tl.float32)  # (BH,)
                    wmask = mask_w[:, None] & mh[None, :]
                wp = w_ptr + rows_w[:, None] * H + offs_h[None, :]
                if EVICT:
                    wt = tl.load(wp, mask=wmask, other=0.0, eviction_policy="evict_first")  # (BW, BH)
                else:
                    wt = tl.load(wp, mask=wmask, other=0.0)  # (BW, BH)
                acc2 += wt.to(tl.float32) * xt[None, :]
            acc = tl.sum(acc2, axis=1)[None, :]  # (1, BW): one reduction after the loop
        return acc

    @triton.jit
    def _gate_kernel(
        x_ptr,
        stride_xm,
        g_ptr,
        stride_gm,
        wg_ptr,
        bg_ptr,
        wu_ptr,
        bu_ptr,
        idx_ptr,
        h_ptr,
        cnt_ptr,
        M,
        H,
        NI,
        threshold,
        ACT: tl.constexpr,
        GATE_FROM_MEMORY: tl.constexpr,
        HAS_BG: tl.constexpr,
        GATED: tl.constexpr,
        FUSE_UP: tl.constexpr,
        HAS_BU: tl.constexpr,
        PER_ROW: tl.constexpr,
        USE_DOT: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_I: tl.constexpr,
        BLOCK_H: tl.constexpr,
        EVEN_H: tl.constexpr = False,
        EVICT: tl.constexpr = False,
    ):
        pid = tl.program_id(0)
        offs_i = pid * BLOCK_I + tl.arange(0, BLOCK_I)
        mask_i = offs_i < NI
        offs_m = tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        mask_mi = mask_m[:, None] & mask_i[None, :]  # (BM, BI)
        if GATE_FROM_MEMORY:
            g = tl.load(g_ptr + offs_m[:, None] * stride_gm + offs_i[None, :], mask=mask_mi, other=0.0)
            g = g.to(tl.float32)
        else:
            g = _rows_dot(
                x_ptr, stride_xm, wg_ptr, mask_m, offs_i, mask_i, H, BLOCK_M, BLOCK_I, BLOCK_H, USE_DOT,
                EVEN_H, EVICT,
            )
        if HAS_BG:
            g += tl.load(bg_ptr + offs_i, mask=mask_i, other=0.0).to(tl.float32)[None, :]
        a = _act(g, ACT)
        active = (tl.abs(a) > threshold) & mask_mi  # (BM, BI)
        h = tl.where(active, a, 0.0)
        any_active = tl.max(active.to(tl.int32), axis=0) > 0  # (BI,) active in some row
        if GATED and FUSE_UP:
            u = tl.zeros([BLOCK_M, BLOCK_I], dtype=tl.float32)
            if tl.sum(any_active.to(tl.int32), axis=0) > 0:  # skip the whole block when nothing fires
                u = _rows_dot(
                    x_ptr,
                    stride_xm,
                    wu_ptr,
                    mask_m,
                    offs_i,
                    any_active,
                    H,
                    BLOCK_M,
                    BLOCK_I,
                    BLOCK_H,
                    USE_DOT,
                    EVEN_H,
                    EVICT,
                )
            if HAS_BU:
                u += tl.load(bu_ptr + offs_i, mask=mask_i, other=0.0).to(tl.float32)[None, :]
            h = h * u
        # Block compaction: reserve a range of slots with one atomic, place by prefix sum.
        if PER_ROW:
            act_i = active.to(tl.int32)
            count = tl.sum(act_i, axis=1)  # (BM,)
            base = tl.atomic_add(cnt_ptr + offs_m, count, mask=mask_m)  # (BM,)
            dst = offs_m[:, None] * NI + base[:, None] + tl.cumsum(act_i, axis=1) - 1  # (BM, BI)
            tl.store(idx_ptr + dst, offs_i[None, :] + 0 * dst, mask=active)
            tl.store(h_ptr + dst, h, mask=active)
        else:
            any_i = any_active.to(tl.int32)
            count = tl.sum(any_i, axis=0)
            base = tl.atomic_add(cnt_ptr, count)
            slot = base + tl.cumsum(any_i, axis=0) - 1  # (BI,)
            tl.store(idx_ptr + slot, offs_i, mask=any_active)
            tl.store(
                h_ptr + offs_m[:, None] * NI + slot[None, :], h, mask=mask_m[:, None] & any_active[None, :]
            )

    @triton.jit
    def _up_kernel(
        x_ptr,
        stride_xm,
        wu_ptr,
        bu_ptr,
        idx_ptr,
        h_ptr,
        cnt_ptr,
        M,
        H,
        NI,
        HAS_BU: tl.constexpr,
        PER_ROW: tl.constexpr,
        USE_DOT: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_H: tl.constexpr,
    ):
        """h_buf[m, k] *= x_m . W_up[idx[k]] (+ b_up) for the slots k < cnt of one list."""
        pid = tl.program_id(0)
        r = tl.program_id(1)
        if PER_ROW:
            list_id = r
            row0 = r
        else:
            list_id = 0
            row0 = 0
        n = tl.load(cnt_ptr + list_id)
        k0 = pid * BLOCK_K
        if k0 < n:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mk = offs_k < n
            idx = tl.load(idx_ptr + list_id * NI + offs_k, mask=mk, other=0)
            rows = row0 + tl.arange(0, BLOCK_M)
            mrow = rows < M
            u = _rows_dot(
                x_ptr + row0 * stride_xm,
                stride_xm,
                wu_ptr,
                mrow,
                idx,
                mk,
                H,
                BLOCK_M,
                BLOCK_K,
                BLOCK_H,
                USE_DOT,
            )  # (BM, BK)
            if HAS_BU:
                u += tl.load(bu_ptr + idx, mask=mk, other=0.0).to(tl.float32)[None, :]
            hp = h_ptr + rows[:, None] * NI + offs_k[None, :]
            m2 = mrow[:, None] & mk[None, :]
            tl.store(hp, tl.load(hp, mask=m2, other=0.0) * u, mask=m2)

    @triton.jit
    def _down_kernel(
        h_ptr,
        idx_ptr,
        cnt_ptr,
        wd_ptr,
        part_ptr,
        M,
        H,
        NI,
        SPLIT,
        PER_ROW: tl.constexpr,
        USE_DOT: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_H: tl.constexpr,
    ):
        """part[s, m, cols] = sum over slice s of the list of h_buf[m, k] * W_down_t[idx[k], cols]."""
        pid_h = tl.program_id(0)
        pid_s = tl.program_id(1)
        r = tl.program_id(2)
        if PER_ROW:
            list_id = r
            row0 = r
        else:
            list_id = 0
            row0 = 0
        n = tl.load(cnt_ptr + list_id)
        chunk = tl.cdiv(tl.cdiv(n, SPLIT), BLOCK_K) * BLOCK_K  # whole tiles per slice
        k_start = pid_s * chunk
        k_end = tl.minimum(k_start + chunk, n)
        offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
        mh = offs_h < H
        rows = row0 + tl.arange(0, BLOCK_M)
        mrow = rows < M
        if USE_DOT:
            acc = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
            for k in range(k_start, k_end, BLOCK_K):
                offs_k = k + tl.arange(0, BLOCK_K)
                mk = offs_k < k_end
                idx = tl.load(idx_ptr + list_id * NI + offs_k, mask=mk, other=0)
                hv = tl.load(
                    h_ptr + rows[:, None] * NI + offs_k[None, :], mask=mrow[:, None] & mk[None, :], other=0.0
                )
                w = tl.load(
                    wd_ptr + idx[:, None] * H + offs_h[None, :], mask=mk[:, None] & mh[None, :], other=0.0
                )
                acc = tl.dot(hv.to(w.dtype), w, acc)  # (BM, BK) @ (BK, BH)
        else:
            acc2 = tl.zeros([BLOCK_K, BLOCK_H], dtype=tl.float32)
            for k in range(k_start, k_end, BLOCK_K):
                offs_k = k + tl.arange(0, BLOCK_K)
                mk = offs_k < k_end
                idx = tl.load(idx_ptr + list_id * NI + offs_k, mask=mk, other=0)
                hv = tl.load(h_ptr + row0 * NI + offs_k, mask=mk, other=0.0)  # (BK,)
                w = tl.load(
                    wd_ptr + idx[:, None] * H + offs_h[None, :], mask=mk[:, None] & mh[None, :], other=0.0
                )
                acc2 += w.to(tl.float32) * hv[:, None]
            acc = tl.sum(acc2, axis=0)[None, :]  # (1, BH)
        # Every program writes its slice, also an empty one: reduce reads all of them.
        tl.store(
            part_ptr + (pid_s * M + rows[:, None]) * H + offs_h[None, :],
            acc,
            mask=mrow[:, None] & mh[None, :],
        )

    @triton.jit
    def _reduce_kernel(
        part_ptr, bd_ptr, out_ptr, stride_om, M, H, SPLIT, HAS_BD: tl.constexpr, BLOCK: tl.constexpr
    ):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < M * H
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for s in range(0, SPLIT):
            acc += tl.load(part_ptr + s * M * H + offs, mask=mask, other=0.0)
        row = offs // H
        col = offs % H
        if HAS_BD:
            acc += tl.load(bd_ptr + col, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_om + col, acc.to(out_ptr.dtype.element_ty), mask=mask)


def check_supported(x2d: Tensor, *mats: Tensor) -> None:
    """Raise ``NotImplementedError`` naming the limit when the Triton path cannot run this case."""
    if not HAS_TRITON:
        raise NotImplementedError(
            "the Triton sparse MLP needs the 'triton' package (pip install 'deftune[gpu]')"
        )
    if not x2d.is_cuda and not _INTERPRETING:
        raise NotImplementedError(f"the Triton sparse MLP runs on CUDA tensors only; got device {x2d.device}")
    if x2d.dtype not in SUPPORTED_DTYPES:
        raise NotImplementedError(
            f"the Triton sparse MLP supports float16/bfloat16 inputs only; got {x2d.dtype} (use backend='reference')"
        )
    if not 1 <= x2d.shape[0] <= MAX_ROWS:
        raise NotImplementedError(
            f"the Triton sparse MLP handles 1..{MAX_ROWS} rows (decoding); got {x2d.shape[0]} rows "
            "(use backend='reference' or a dense MLP for prefill)"
        )
    for w in mats:
        if w.dtype != x2d.dtype or w.device != x2d.device:
            raise NotImplementedError(
                f"weights must share the input's dtype and device ({x2d.dtype}, {x2d.device}); got {w.dtype}, {w.device}"
            )
        if not w.is_contiguous():
            raise NotImplementedError(f"weight of shape {tuple(w.shape)} must be contiguous (I, H) row-major")
        if w.numel() >= 2**31:
            raise NotImplementedError(
                f"weight of {w.numel()} elements exceeds the int32 indexing limit 2**31"
            )


def launch_sparse_mlp(
    x2d: Tensor,
    *,
    w_gate: Tensor,
    w_down_t: Tensor,
    threshold: float,
    activation: str,
    w_up: Tensor | None = None,
    b_gate: Tensor | None = None,
    b_up: Tensor | None = None,
    b_down: Tensor | None = None,
    gate_values: Tensor | None = None,
    scheme: str = "union",
    gate: str = "triton",
    config: KernelConfig | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Run the sparse MLP on ``x2d`` ``(M, H)``, ``1 <= M <= 16``; returns ``(M, H)`` in ``x2d.dtype``.

    Layouts: ``w_gate``, ``w_up``, ``w_down_t`` are contiguous ``(I, H)`` (``w_down_t`` is the
    transposed down projection); biases ``(I,)``/``(H,)``. Gated when ``w_up`` is given, else
    ``w_gate`` is the non-gated up projection. ``activation`` is a key of :data:`ACT_IDS`.
    ``gate_values`` ``(M, I)``: precomputed gate pre-activations, bias included (then ``w_gate``
    is not read; ``activation`` is still applied, pass ``"identity"`` for activated values) — used
    for activations the kernel lacks and by the input-sparse down projection. fp32 accumulation throughout; ``out`` (``(M, H)``, any row
    stride) is written in place when given.
    """
    gated = w_up is not None
    mats = [w_gate, w_down_t] + ([w_up] if gated else [])
    check_supported(x2d, *mats)
    if activation not in ACT_IDS:
        raise NotImplementedError(
            f"activation {activation!r} has no Triton kernel; supported: {sorted(ACT_IDS)}"
        )
    if scheme not in SCHEMES:
        raise ValueError(f"scheme={scheme!r} is not one of {SCHEMES}")
    if gate not in GATE_MODES:
        raise ValueError(f"gate={gate!r} is not one of {GATE_MODES}")
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    M, H = x2d.shape
    NI = w_gate.shape[0]
    if w_gate.shape[1] != H:
        raise ValueError(f"x has hidden size {H} but the weights are {tuple(w_gate.shape)} (I, H)")
    cfg = config or default_config(M, H, NI)
    use_dot = M > 1
    block_m = MAX_ROWS if use_dot else 1
    per_row = scheme == "per_row" and M > 1
    lists = M if per_row else 1
    dev = x2d.device

    if gate_values is None and gate == "cublas":
        gate_values = F.linear(x2d, w_gate, b_gate)  # (M, I) dense GEMV/GEMM by cuBLAS, bias included
    if gate_values is not None and (tuple(gate_values.shape) != (M, NI) or gate_values.stride(-1) != 1):
        raise ValueError(
            f"gate_values must be ({M}, {NI}) with unit column stride; got {tuple(gate_values.shape)}"
        )
    act_id = ACT_IDS[activation]
    from_memory = gate_values is not None
    b_gate_k = None if from_memory else b_gate  # the cuBLAS gate already added it
    # Tensor-core tiles need >= 16 along every axis.
    block_i = max(16, cfg.gate_block_i) if use_dot else cfg.gate_block_i

    ints = torch.empty(lists * (NI + 1), dtype=torch.int32, device=dev)
    cnt = ints[:lists]
    cnt.zero_()
    idx = ints[lists:]  # (lists, I) compact neuron indices
    hbuf = torch.empty(M, NI, dtype=torch.float32, device=dev)  # (M, I) values at compact slots
    dummy = w_gate  # placeholder for absent optional pointers (never read)

    fuse_up = gated and cfg.fuse_up
    _gate_kernel[(triton.cdiv(NI, block_i),)](
        x2d,
        x2d.stride(0),
        gate_values if from_memory else dummy,
        gate_values.stride(0) if from_memory else 0,
        w_gate,
        b_gate_k if b_gate_k is not None else dummy,
        w_up if gated else dummy,
        b_up if b_up is not None else dummy,
        idx,
        hbuf,
        cnt,
        M,
        H,
        NI,
        float(threshold),
        ACT=act_id,
        GATE_FROM_MEMORY=from_memory,
        HAS_BG=b_gate_k is not None,
        GATED=gated,
        FUSE_UP=fuse_up,
        HAS_BU=b_up is not None,
        PER_ROW=per_row,
        USE_DOT=use_dot,
        BLOCK_M=block_m,
        BLOCK_I=block_i,
        BLOCK_H=max(16, cfg.gate_block_h),
        EVEN_H=H % max(16, cfg.gate_block_h) == 0,
        EVICT=cfg.gate_evict,
        num_warps=cfg.gate_warps,
        num_stages=cfg.gate_stages,
    )
    if gated and not fuse_up:
        _launch_up(x2d, w_up, b_up, idx, hbuf, cnt, M, H, NI, per_row, use_dot, cfg, dummy)

    down_dot = use_dot and not per_row
    down_bk = max(16, cfg.down_block_k) if down_dot else cfg.down_block_k
    down_bh = max(16, cfg.down_block_h) if down_dot else cfg.down_block_h
    split = _split_for(cfg.down_split, dev, triton.cdiv(H, down_bh) * lists, triton.cdiv(NI, down_bk))
    part = torch.empty(split, M, H, dtype=torch.float32, device=dev)  # fp32 partial sums
    _down_kernel[(triton.cdiv(H, down_bh), split, lists)](
        hbuf,
        idx,
        cnt,
        w_down_t,
        part,
        M,
        H,
        NI,
        split,
        PER_ROW=per_row,
        USE_DOT=down_dot,
        BLOCK_M=block_m if down_dot else 1,
        BLOCK_K=down_bk,
        BLOCK_H=down_bh,
        num_warps=cfg.down_warps,
        num_stages=cfg.down_stages,
    )
    if out is None:
        out = torch.empty(M, H, dtype=x2d.dtype, device=dev)
    elif tuple(out.shape) != (M, H) or out.stride(-1) != 1 or out.dtype != x2d.dtype:
        raise ValueError(
            f"out must be ({M}, {H}) {x2d.dtype} with unit column stride; got {tuple(out.shape)} {out.dtype}"
        )
    block = 1024
    _reduce_kernel[(triton.cdiv(M * H, block),)](
        part,
        b_down if b_down is not None else dummy,
        out,
        out.stride(0),
        M,
        H,
        split,
        HAS_BD=b_down is not None,
        BLOCK=block,
        num_warps=4,
    )
    return out


def _launch_up(x2d, w_up, b_up, idx, hbuf, cnt, M, H, NI, per_row, use_dot, cfg, dummy) -> None:
    dot = use_dot and not per_row
    block_m = MAX_ROWS if dot else 1
    block_k = max(cfg.up_block_k, 16) if dot else cfg.up_block_k
    _up_kernel[(triton.cdiv(NI, block_k), M if per_row else 1)](
        x2d,
        x2d.stride(0),
        w_up,
        b_up if b_up is not None else dummy,
        idx,
        hbuf,
        cnt,
        M,
        H,
        NI,
        HAS_BU=b_up is not None,
        PER_ROW=per_row,
        USE_DOT=dot,
        BLOCK_M=block_m,
        BLOCK_K=block_k,
        BLOCK_H=max(16, cfg.up_block_h) if dot else cfg.up_block_h,
        num_warps=cfg.up_warps,
    )


def with_overrides(config: KernelConfig, **changes) -> KernelConfig:
    """A copy of ``config`` with ``changes`` (benchmarks sweep block sizes with it)."""
    return replace(config, **changes)
