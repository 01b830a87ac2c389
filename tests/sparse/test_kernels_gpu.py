"""Triton kernels against the reference: odd shapes x dtypes x rows x schemes, fresh random inputs.

GPU tests are marked ``gpu`` and skipped without CUDA. Every run draws new inputs (the seed is
printed on failure); outputs are poisoned with NaN first, so an unwritten element fails.
The threshold is placed in the widest gap between neighbouring |a| values near the target
density, so that fp32 rounding cannot flip a neuron across it (see ``_gap_threshold``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from deftune.sparse import (
    GatedMLPWeights,
    KernelConfig,
    MLPWeights,
    SparseMLPConfig,
    sparse_down_proj,
    sparse_gated_mlp,
    sparse_mlp,
)
from deftune.sparse.reference import ACTIVATIONS, gated_mlp_reference
from deftune.sparse.triton_mlp import GENERIC_CONFIGS, default_config

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TOL = {torch.bfloat16: 1.2e-2, torch.float16: 4e-3}


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def _gap_threshold(a: torch.Tensor, density: float) -> float:
    """A threshold near the (1 - density) quantile of |a|, in the widest gap of 9 neighbouring values.

    Neighbours are *distinct* values: a gate read back from a bf16 GEMM has many exact ties, and a
    threshold equal to a tied value would let fp32-vs-fp64 rounding of the activation flip the
    whole tie group.
    """
    v = a.detach().abs().flatten().double().sort().values
    if density >= 1.0 or v.numel() < 2:
        return 0.0
    u = v.unique()  # sorted, distinct
    if u.numel() < 2:
        return float(u[0]) / 2
    k = int(torch.searchsorted(u, v[int((1 - density) * (v.numel() - 1))]))
    lo, hi = max(0, k - 4), min(u.numel() - 1, k + 5)
    gaps = u[lo + 1 : hi + 1] - u[lo:hi]
    j = int(gaps.argmax())
    return float((u[lo + j] + u[lo + j + 1]) / 2)


def _case(rows, hidden, inter, dtype, gated, bias, density, gate_mode):
    dev = "cuda"
    x = torch.randn(rows, hidden, device=dev).to(dtype)
    wg = (torch.randn(inter, hidden, device=dev) / hidden**0.5).to(dtype)
    wu = (torch.randn(inter, hidden, device=dev) / hidden**0.5).to(dtype)
    wd = (torch.randn(inter, hidden, device=dev) / inter**0.5).to(dtype)
    bg = (0.1 * torch.randn(inter, device=dev)).to(dtype) if bias else None
    bu = (0.1 * torch.randn(inter, device=dev)).to(dtype) if bias and gated else None
    bd = (0.1 * torch.randn(hidden, device=dev)).to(dtype) if bias else None
    # The oracle's gate: fp64 of the same inputs, or cuBLAS' own rounded output when the kernel reads it.
    if gate_mode == "cublas":
        g = F.linear(x, wg, bg).double()
    else:
        g = x.double() @ wg.double().T + (0 if bg is None else bg.double())
    return x, wg, wu, wd, bg, bu, bd, g


def _check(y, ref, dtype, seed, what):
    assert torch.isfinite(y).all(), f"unwritten/NaN output ({what}, seed {seed})"
    err = _rel(y, ref)
    assert err < TOL[dtype], f"rel err {err:.2e} >= {TOL[dtype]} ({what}, seed {seed})"


def _run(
    rows,
    hidden,
    inter,
    dtype,
    gated,
    act,
    density,
    scheme="union",
    gate="triton",
    fuse_up=True,
    bias=False,
    kernel=None,
):
    seed = torch.seed()
    x, wg, wu, wd, bg, bu, bd, g = _case(rows, hidden, inter, dtype, gated, bias, density, gate)
    a = ACTIVATIONS[act](g)
    t = _gap_threshold(a, density)
    kernel = replace(kernel or default_config(rows, hidden, inter), fuse_up=fuse_up)
    cfg = SparseMLPConfig(backend="triton", scheme=scheme, gate=gate, kernel=kernel)
    out = torch.full((rows, hidden), float("nan"), device="cuda", dtype=dtype)
    d64 = {k: (None if v is None else v.double()) for k, v in dict(wu=wu, wd=wd, bu=bu, bd=bd).items()}
    a_m = torch.where(a.abs() > t, a, 0.0)
    if gated:
        weights = GatedMLPWeights(wg, wu, wd, bg, bu, bd)
        y = sparse_gated_mlp(x, weights, t, act, cfg, out=out)
        u = x.double() @ d64["wu"].T + (0 if bu is None else d64["bu"])
        ref = (a_m * u) @ d64["wd"] + (0 if bd is None else d64["bd"])
    else:
        y = sparse_mlp(x, MLPWeights(wg, wd, bg, bd), t, act, cfg, out=out)
        ref = a_m @ d64["wd"] + (0 if bd is None else d64["bd"])
    assert y.data_ptr() == out.data_ptr()
    _check(
        y,
        ref,
        dtype,
        seed,
        f"rows={rows} H={hidden} I={inter} {dtype} gated={gated} {act} d={density} "
        f"{scheme} gate={gate} fuse_up={fuse_up} bias={bias}",
    )


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("scheme", ["union", "per_row"])
@pytest.mark.parametrize("gated", [True, False])
def test_every_kept_neuron_is_written_and_every_dropped_one_is_not(rows, scheme, gated):
    """With an identity down projection, output feature i is neuron i's own contribution, so a
    dropped (or wrongly kept) neuron shows in one element — which a whole-output norm would miss."""
    seed = torch.seed()
    n, dtype, act = 1536, torch.bfloat16, ("silu" if gated else "relu")
    x, wg, wu, _, _, _, _, g = _case(rows, n, n, dtype, gated, False, 0.25, "triton")
    eye = torch.eye(n, device="cuda", dtype=dtype)  # w_down_t: neuron i writes feature i only
    a = ACTIVATIONS[act](g)
    t = _gap_threshold(a, 0.25)
    kept = a.abs() > t
    cfg = SparseMLPConfig(backend="triton", scheme=scheme)
    out = torch.full((rows, n), float("nan"), device="cuda", dtype=dtype)
    if gated:
        y = sparse_gated_mlp(x, GatedMLPWeights(wg, wu, eye), t, act, cfg, out=out)
        ref = torch.where(kept, a, 0.0) * (x.double() @ wu.double().T)
    else:
        y = sparse_mlp(x, MLPWeights(wg, eye), t, act, cfg, out=out)
        ref = torch.where(kept, a, 0.0)
    what = f"rows={rows} {scheme} gated={gated}, seed {seed}"
    assert torch.isfinite(y).all(), f"unwritten output ({what})"
    assert torch.equal(y != 0, kept), f"{int(((y != 0) != kept).sum())} neurons kept/dropped wrongly ({what})"
    torch.testing.assert_close(y.double(), ref, rtol=3e-2, atol=2e-3, msg=lambda m: f"{m} ({what})")


SHAPES = [(1023, 1), (64, 1023), (1023, 4001), (576, 1536), (4096, 11008)]
ROWS = [1, 2, 3, 8, 16]


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("hidden, inter", SHAPES)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gated", [True, False])
def test_kernel_matches_reference(hidden, inter, rows, dtype, gated):
    for density in (0.05, 0.5, 1.0):
        _run(rows, hidden, inter, dtype, gated, "silu" if gated else "gelu", density, bias=not gated)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("scheme", ["union", "per_row"])
@pytest.mark.parametrize("gate", ["triton", "cublas"])
@pytest.mark.parametrize("fuse_up", [True, False])
@pytest.mark.parametrize("rows", [1, 5, 16])
def test_every_variant_matches_reference(scheme, gate, fuse_up, rows):
    _run(rows, 1000, 3001, torch.bfloat16, True, "silu", 0.2, scheme, gate, fuse_up, bias=True)
    _run(rows, 333, 777, torch.float16, False, "relu", 0.2, scheme, gate, fuse_up, bias=True)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("rows", [1, 6])
def test_every_activation_matches_reference(act, rows):
    _run(rows, 257, 1000, torch.bfloat16, True, act, 0.3)
    _run(rows, 257, 1000, torch.float16, False, act, 0.3, bias=True)


@pytest.mark.gpu
@cuda
def test_each_activation_is_its_own_formula():
    """On gates where the activations differ most (``kernel_cases.BANDS``), each kernel activation
    matches its formula and not another's: exact and tanh GELU are ~14 % apart there."""
    from kernel_cases import activation_errors, check_activation_errors

    check_activation_errors(activation_errors("cuda"), TOL[torch.float16])


# Corners of the block-size grids that benchmarks/sparse_mlp.py --tune searches (any pick must be
# right), each with the row counts it is used for (1 row: FMA GEMV; 2..16 rows: tensor-core tiles).
B1_GRID = [
    KernelConfig(
        gate_block_i=4, gate_block_h=1024, gate_warps=4, gate_stages=3, down_block_k=128, down_split=32
    ),
    KernelConfig(
        gate_block_i=16, gate_block_h=512, gate_warps=8, gate_stages=2, down_block_k=32, down_block_h=64
    ),
    GENERIC_CONFIGS["b1"],
]
BN_GRID = [
    KernelConfig(
        gate_block_i=128, gate_block_h=64, gate_warps=8, fuse_up=False, up_block_k=32, up_block_h=512
    ),
    KernelConfig(gate_block_i=32, gate_block_h=128, down_block_k=128, down_block_h=64, down_split=8),
    GENERIC_CONFIGS["bn"],
]
GRID_CASES = [(c, 1) for c in B1_GRID] + [(c, r) for c in BN_GRID for r in (3, 16)]


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("kernel, rows", GRID_CASES, ids=lambda v: str(v) if isinstance(v, int) else "cfg")
def test_tuning_grid_configs_match_reference(kernel, rows):
    _run(rows, 1023, 4001, torch.bfloat16, True, "silu", 0.15, fuse_up=kernel.fuse_up, kernel=kernel)
    _run(rows, 4096, 1000, torch.float16, True, "silu", 0.6, fuse_up=kernel.fuse_up, kernel=kernel)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("rows", [1, 4, 16])
def test_down_proj_skips_zero_inputs(rows):
    seed = torch.seed()
    a = torch.randn(rows, 2049, device="cuda")
    a = torch.where(a.abs() > 1.5, a, 0.0).to(torch.bfloat16)
    w_t = torch.randn(2049, 1000, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(1000, device="cuda", dtype=torch.bfloat16)
    out = torch.full((rows, 1000), float("nan"), device="cuda", dtype=torch.bfloat16)
    y = sparse_down_proj(a, w_t, b, SparseMLPConfig(backend="triton"), out=out)
    _check(y, a.double() @ w_t.double() + b.double(), torch.bfloat16, seed, f"down rows={rows}")


@pytest.mark.gpu
@cuda
def test_cuda_graph_replay_with_new_inputs():
    seed = torch.seed()
    hidden, inter = 512, 1408
    w = GatedMLPWeights(
        *[(torch.randn(inter, hidden, device="cuda") / hidden**0.5).to(torch.bfloat16) for _ in range(3)]
    )
    x = torch.randn(1, hidden, device="cuda", dtype=torch.bfloat16)
    cfg = SparseMLPConfig(backend="triton")
    sparse_gated_mlp(x, w, 0.3, "silu", cfg)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = sparse_gated_mlp(x, w, 0.3, "silu", cfg)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        ref = gated_mlp_reference(
            x.double(), GatedMLPWeights(*[m.double() for m in (w.w_gate, w.w_up, w.w_down_t)]), 0.3, "silu"
        )
        _check(y, ref, torch.bfloat16, seed, "graph replay")


@pytest.mark.gpu
@cuda
def test_unsupported_cases_raise_not_implemented():
    w = GatedMLPWeights(*[torch.randn(64, 32, device="cuda", dtype=torch.bfloat16) for _ in range(3)])
    forced = SparseMLPConfig(backend="triton")
    with pytest.raises(NotImplementedError, match="1..16 rows"):
        sparse_gated_mlp(torch.randn(17, 32, device="cuda", dtype=torch.bfloat16), w, 0.0, config=forced)
    w32 = GatedMLPWeights(*[m.float() for m in (w.w_gate, w.w_up, w.w_down_t)])
    with pytest.raises(NotImplementedError, match="float16/bfloat16"):
        sparse_gated_mlp(torch.randn(1, 32, device="cuda"), w32, 0.0, config=forced)
    x = torch.randn(1, 32, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with pytest.raises(NotImplementedError, match="inference-only"):
        sparse_gated_mlp(x, w, 0.0, config=forced)
    # auto falls back to the (correct) reference for 17 rows
    x17 = torch.randn(17, 32, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(sparse_gated_mlp(x17, w, 0.1), gated_mlp_reference(x17, w, 0.1))


_INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from deftune.sparse.reference import GatedMLPWeights, gated_mlp_reference
    from deftune.sparse.triton_mlp import KernelConfig, launch_sparse_mlp
    sys.path.insert(0, sys.argv[1])
    from kernel_cases import activation_errors, check_activation_errors
    for rows, scheme, fuse in [(1, "union", True), (3, "union", False), (3, "per_row", True)]:
        x = torch.randn(rows, 40, dtype=torch.float16)
        w = [(torch.randn(70, 40) / 7).half() for _ in range(3)]
        y = launch_sparse_mlp(x, w_gate=w[0], w_up=w[1], w_down_t=w[2], threshold=0.2, activation="silu",
                              scheme=scheme, config=KernelConfig(fuse_up=fuse))
        ref = gated_mlp_reference(x.double(), GatedMLPWeights(*[m.double() for m in w]), 0.2, "silu")
        err = float((y.double() - ref).norm() / ref.norm())
        assert torch.isfinite(y).all() and err < 4e-3, (rows, scheme, fuse, err)
    check_activation_errors(activation_errors("cpu"), 4e-3)
    # a callable activation: the gate is activated outside the kernel and read back (identity inside)
    from deftune.sparse import SparseMLPConfig, sparse_gated_mlp
    twice_silu = lambda t: 2 * torch.nn.functional.silu(t)
    x = torch.randn(2, 40, dtype=torch.float16)
    w = [(torch.randn(70, 40) / 7).half() for _ in range(3)]
    y = sparse_gated_mlp(x, GatedMLPWeights(*w), 0.2, twice_silu, SparseMLPConfig(backend="triton"))
    ref = gated_mlp_reference(x.double(), GatedMLPWeights(*[m.double() for m in w]), 0.2, twice_silu)
    err = float((y.double() - ref).norm() / ref.norm())
    assert err < 4e-3, ("callable", err)
    """
)


def _version(text: str) -> tuple[int, int]:
    return tuple(int(p) for p in text.split("+")[0].split(".")[:2])  # type: ignore[return-value]


def test_kernels_in_triton_interpreter():
    """The kernels' logic on CPU via TRITON_INTERPRET=1 (fp16: the interpreter's bf16 dot is unreliable).

    ``make test`` installs Triton for this; without it the test skips.
    """
    triton = pytest.importorskip("triton")
    import numpy

    if _version(numpy.__version__) >= (2, 4) and _version(triton.__version__) < (3, 9):
        pytest.skip(f"Triton {triton.__version__}'s interpreter calls int() on 1-element arrays, an error from "
                    "numpy 2.4 (Triton 3.6 fails; 3.9 works)")
    env = dict(os.environ, TRITON_INTERPRET="1")
    here = os.path.dirname(os.path.abspath(__file__))
    subprocess.run([sys.executable, "-c", _INTERPRETER_SCRIPT, here], check=True, env=env, timeout=300)
