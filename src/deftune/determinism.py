"""Bitwise-repeatable training runs on a GPU: torch's deterministic algorithms, for one run.

On CPU the training loop repeated bit for bit in every check. On a GPU some kernels accumulate with
atomic adds in an order that changes from run to run, so two runs of one command can differ in
the last bits and, through training, in the metric (prefix-tuning runs on the H100:
``docs/results_log.md``, fifteenth session). :func:`deterministic_algorithms` switches torch to its
deterministic kernels (``torch.use_deterministic_algorithms``; an op without one raises a
``RuntimeError`` naming it), turns off cuDNN's autotuner and sets ``CUBLAS_WORKSPACE_CONFIG``, which
cuBLAS needs for repeatable results and reads when CUDA starts (``train_glue`` enters this before
it touches the GPU) — then restores all of it. See
https://pytorch.org/docs/stable/notes/randomness.html.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

CUBLAS_ENV = "CUBLAS_WORKSPACE_CONFIG"
CUBLAS_VALUE = ":4096:8"


@contextmanager
def deterministic_algorithms(enabled: bool = True) -> Iterator[None]:
    """Run the body with torch's deterministic algorithms (no-op when ``enabled`` is False)."""
    if not enabled:
        yield
        return
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, os.environ.get(CUBLAS_ENV))
    os.environ.setdefault(CUBLAS_ENV, CUBLAS_VALUE)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        mode, warn_only, benchmark, cublas = saved
        torch.use_deterministic_algorithms(mode, warn_only=warn_only)
        torch.backends.cudnn.benchmark = benchmark
        if cublas is None:
            os.environ.pop(CUBLAS_ENV, None)
        else:
            os.environ[CUBLAS_ENV] = cublas
