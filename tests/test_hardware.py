"""The hardware record: a GPU is named only where the figures were measured on it."""

from __future__ import annotations

import torch

from deftune.hardware import describe, describe_line


def test_a_cpu_measurement_on_a_gpu_machine_names_no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: f"Fake GPU {device}")
    assert "gpu" not in describe("cpu") and "no GPU" in describe_line(describe("cpu"))
    assert describe()["gpu"] == "Fake GPU 0"  # code that runs on the GPU when there is one
    assert describe("cuda:1")["gpu"].startswith("Fake GPU cuda:1")


def test_no_gpu_is_named_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "gpu" not in describe() and "gpu" not in describe("cuda")
    assert {"cpu", "cores", "torch_threads", "torch", "python"} <= set(describe())
