"""Speed and memory of dense vs skipped models: latency (median of repeats), peak memory, bytes.

* :func:`compare_latency` times several models on the same inputs, **interleaved** round-robin
  (dense, skipped, dense, skipped, …) so that drifting machine load hits every model alike, and
  reports the median per model. On CUDA each call is bracketed by ``torch.cuda.synchronize``.
* :func:`peak_memory` — CUDA: ``torch.cuda.max_memory_allocated`` during one forward pass
  (weights included). CPU: the process's peak resident set size (:func:`peak_rss_bytes`), which
  only grows; compare models by running each in a fresh process (``benchmarks/ada_latency.py``).
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass
class LatencyStats:
    """Wall-clock latency of one forward pass, in milliseconds."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int

    def to_dict(self) -> dict:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


@torch.inference_mode()
def compare_latency(
    runs: Mapping[str, Callable[[], object]],
    *,
    repeats: int = 20,
    warmup: int = 3,
    device: torch.device | str = "cpu",
) -> dict[str, LatencyStats]:
    """Median latency of each zero-argument callable in ``runs`` (e.g. ``lambda: model(**batch)``).

    The callables are run round-robin ``warmup`` times untimed, then ``repeats`` times timed.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    device = torch.device(device)
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {
        name: LatencyStats(statistics.median(v), _quantile(v, 0.1), _quantile(v, 0.9), len(v))
        for name, v in samples.items()
    }


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (bytes).

    Linux: ``VmHWM`` of ``/proc/self/status`` — the high-water mark of *this* address space.
    (``ru_maxrss`` is not used there: across ``fork`` + ``exec`` it keeps the parent's peak, so a
    fresh child process would report its parent's memory.)
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # Linux reports KiB


@torch.inference_mode()
def peak_memory(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> int:
    """Peak memory (bytes) of one forward pass: CUDA allocator peak, or process peak RSS on CPU."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        model(**inputs)
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    model(**inputs)
    return peak_rss_bytes()
