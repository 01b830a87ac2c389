"""A one-line description of the machine, recorded next to every measured figure."""

from __future__ import annotations

import os
import platform


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(device: str | None = None) -> dict[str, str | int]:
    """CPU model, usable cores, torch threads, torch version and, under ``gpu``, the GPU the figures
    were measured on: the first CUDA device when ``device`` is None (code that runs on the GPU when
    there is one) or a CUDA device, nothing for ``device="cpu"`` (figures measured on the CPU of a
    machine that also has a GPU)."""
    import torch

    info: dict[str, str | int] = {
        "cpu": cpu_name(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    on = torch.device(device) if device is not None else None
    if torch.cuda.is_available() and (on is None or on.type == "cuda"):
        info["gpu"] = torch.cuda.get_device_name(on if on is not None and on.index is not None else 0)
    return info


def describe_line(d: dict | None = None) -> str:
    """One line naming the hardware of ``d`` (a :func:`describe` result; default: this machine)."""
    d = describe() if d is None else d
    gpu = f", GPU {d['gpu']}" if "gpu" in d else ", no GPU"
    return f"{d['cpu']} ({d['cores']} cores, {d['torch_threads']} torch threads){gpu}; torch {d['torch']}"
