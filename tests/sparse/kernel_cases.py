"""Kernel checks shared by the GPU tests and the Triton-interpreter test (which runs them on CPU)."""

from __future__ import annotations

import torch

from deftune.sparse.reference import ACTIVATIONS
from deftune.sparse.triton_mlp import KernelConfig, launch_sparse_mlp

KERNEL_ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")
# Where each activation's gate pre-activations are drawn: on [-4, -3] the MLP outputs of exact and
# tanh GELU differ by ~14 % (on N(0, 1) gates by less than the fp16 tolerance) and SiLU's by far
# more; ReLU is 0 there, so it is checked on [-1, 1], where it is far from the others.
BANDS = {"silu": (-4.0, -3.0), "gelu": (-4.0, -3.0), "gelu_tanh": (-4.0, -3.0), "relu": (-1.0, 1.0)}


def activation_errors(device: str, rows: int = 2, hidden: int = 48, inter: int = 96) -> dict[tuple[str, str], float]:
    """Relative error of the kernel run with activation ``k`` against the fp64 reference computed with
    activation ``r``, for every pair ``(k, r)``: a gated MLP in fp16, dense (threshold 0)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, hidden, generator=g).half().to(device)
    w_gate = (0.01 * torch.randn(inter, hidden, generator=g)).half().to(device)  # the bias sets the gate
    w_up = (torch.randn(inter, hidden, generator=g) / hidden**0.5).half().to(device)
    w_down_t = (torch.randn(inter, hidden, generator=g) / inter**0.5).half().to(device)
    u = torch.rand(inter, generator=g)  # (I,)
    errors = {}
    for act in KERNEL_ACTIVATIONS:
        lo, hi = BANDS[act]
        b_gate = (lo + (hi - lo) * u).half().to(device)
        y = launch_sparse_mlp(x, w_gate=w_gate, w_up=w_up, w_down_t=w_down_t, b_gate=b_gate, threshold=0.0,
                              activation=act, config=KernelConfig())  # (M, H)
        gate = x.double() @ w_gate.double().T + b_gate.double()  # (M, I)
        up = x.double() @ w_up.double().T  # (M, I)
        for ref in KERNEL_ACTIVATIONS:
            expected = (ACTIVATIONS[ref](gate) * up) @ w_down_t.double()  # (M, H)
            errors[(act, ref)] = float((y.double() - expected).norm() / expected.norm().clamp_min(1e-30))
    return errors


def check_activation_errors(errors: dict[tuple[str, str], float], tol: float) -> None:
    """Each kernel activation within ``tol`` of its own formula and over ``10 · tol`` from the others."""
    for (act, ref), err in errors.items():
        if act == ref:
            assert err < tol, f"{act}: rel err {err:.2e} >= {tol}"
        else:
            assert err > 10 * tol, f"{act} is within {err:.2e} of {ref}: the check cannot tell them apart"
