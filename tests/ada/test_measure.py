"""Measurement helpers (no wall-clock assertions)."""

from __future__ import annotations

import psutil
import pytest

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
    assert peak_memory(model, bert_case.inputs()) >= peak_rss_bytes() * 0.99
