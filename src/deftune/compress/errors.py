"""Error metrics for lossy compression: relative norm error and signal-to-quantization-noise ratio."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def relative_error(reference: Tensor, approx: Tensor) -> float:
    """``||reference - approx||_F / ||reference||_F`` (0 for an exact copy; ``inf`` if the reference is 0)."""
    ref, app = reference.detach().double(), approx.detach().double()
    if ref.shape != app.shape:
        raise ValueError(f"shapes differ: reference {tuple(ref.shape)} vs approx {tuple(app.shape)}")
    num, den = torch.linalg.vector_norm(ref - app).item(), torch.linalg.vector_norm(ref).item()
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def sqnr_db(reference: Tensor, approx: Tensor) -> float:
    """Signal-to-quantization-noise ratio ``20 log10(||x|| / ||x - x_hat||)`` in dB (``inf`` if exact)."""
    rel = relative_error(reference, approx)
    if rel == 0.0:
        return math.inf
    return -20.0 * math.log10(rel)
