"""Measurement helpers (no wall-clock assertions)."""

from __future__ import annotations

import subprocess
import sys

import psutil
import pytest
import torch

from deftune.ada.measure import compare_latency, peak_memory, peak_rss_bytes


def test_compare_latency_interleaves_and_counts_repeats():
    calls: list[str] = []
    stats = compare_latency(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=4, warmup=1
    )
    assert calls == ["a", "b"] * 5  # round-robin: warm-up then timed, alternating
    for s in stats.values():
        assert s.repeats == 4 and s.p10_ms <= s.median_ms <= s.p90_ms
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        compare_latency({"a": lambda: None}, repeats=0)


def test_peak_rss_is_at_least_the_current_rss(bert_case):
    assert peak_rss_bytes() >= psutil.Process().memory_info().rss * 0.99
    model = bert_case.build().eval()
    # on the CPU the peak of a pass is the process's peak RSS: at least what the process holds after it
    assert peak_memory(model, bert_case.inputs()) >= psutil.Process().memory_info().rss * 0.99


def test_peak_rss_rises_with_a_large_allocation():
    """In a fresh process (a worker's earlier peak would hide it): touching 300 MB raises the peak."""
    code = ("from deftune.ada.measure import peak_rss_bytes; import torch; before = peak_rss_bytes(); "
            "x = torch.ones(75_000_000); print(before, peak_rss_bytes())")
    before, after = map(int, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                            check=True).stdout.split())
    assert after - before >= 250e6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_peak_memory_on_cuda_counts_the_weights_and_the_pass(bert_case):
    model = bert_case.build().eval().cuda()
    inputs = {k: v.cuda() for k, v in bert_case.inputs().items()}
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert peak_memory(model, inputs) > weights  # the allocator's peak holds the weights and activations
