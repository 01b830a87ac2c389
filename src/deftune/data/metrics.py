"""Task metrics computed locally (no Hub metric scripts): accuracy, F1, Matthews, Pearson, Spearman.

All metric values are returned on a 0–100 scale, as GLUE tables report them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

MetricFn = Callable[[Sequence[float], Sequence[float]], float]
METRICS: dict[str, MetricFn] = {}


def register_metric(name: str) -> Callable[[MetricFn], MetricFn]:
    """Decorator: register ``fn(pred, ref) -> value`` (higher is better) under ``name``."""

    def deco(fn: MetricFn) -> MetricFn:
        METRICS[name] = fn
        return fn

    return deco


def _arrays(pred, ref) -> tuple[np.ndarray, np.ndarray]:
    p, r = np.asarray(pred), np.asarray(ref)
    if p.shape != r.shape:
        raise ValueError(f"predictions {p.shape} and references {r.shape} differ in shape")
    if p.size == 0:
        raise ValueError("cannot compute a metric on zero examples")
    return p, r


@register_metric("accuracy")
def accuracy(pred, ref) -> float:
    p, r = _arrays(pred, ref)
    return 100.0 * float((p == r).mean())


@register_metric("f1")
def f1(pred, ref) -> float:
    """Binary F1 of the positive class 1."""
    from sklearn.metrics import f1_score

    p, r = _arrays(pred, ref)
    return 100.0 * float(f1_score(r, p, zero_division=0))


@register_metric("matthews")
def matthews(pred, ref) -> float:
    from sklearn.metrics import matthews_corrcoef

    p, r = _arrays(pred, ref)
    return 100.0 * float(matthews_corrcoef(r, p))


@register_metric("pearson")
def pearson(pred, ref) -> float:
    from scipy.stats import pearsonr

    p, r = _arrays(pred, ref)
    if np.std(p) == 0 or np.std(r) == 0:
        return 0.0
    return 100.0 * float(pearsonr(p, r)[0])


@register_metric("spearman")
def spearman(pred, ref) -> float:
    from scipy.stats import spearmanr

    p, r = _arrays(pred, ref)
    if np.std(p) == 0 or np.std(r) == 0:
        return 0.0
    return 100.0 * float(spearmanr(p, r)[0])


def compute_metrics(names: Sequence[str], pred: Sequence, ref: Sequence) -> dict[str, float]:
    """``{name: value}`` of the registered metrics ``names`` for predictions ``pred`` against ``ref``."""
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {sorted(METRICS)}")
    return {n: METRICS[n](pred, ref) for n in names}
