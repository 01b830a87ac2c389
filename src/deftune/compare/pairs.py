"""DEFT-vs-PEFT pairs of a compare grid's rows: what each row is compared as (:func:`variant`),
the pooled averages per α and per method (:func:`summarise`) and their markdown section
(:func:`summary_lines`). Used by the report, the α selection and ``benchmarks/glue_protocols.py``."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from statistics import fmean, stdev
from typing import Any


def sample_sd(values: Sequence[float]) -> float:
    """Sample standard deviation; 0 for a single value."""
    return stdev(values) if len(values) > 1 else 0.0


def variant(row: dict[str, Any]) -> float | str:
    """What a row is compared as: its α, or ``"t<density>"`` for a threshold-route run (α = 0
    through activation thresholds calibrated to that density). PEFT is the variant ``0.0``."""
    density = row.get("act_threshold_density")
    return f"t{float(density):g}" if density is not None else float(row["alpha"])


def variant_label(v: float | str) -> str:
    """``α = 0.1`` or ``α = 0, thresholds at density 0.55``."""
    return f"α = {v:g}" if isinstance(v, float) else f"α = 0, thresholds at density {v[1:]}"


def variant_order(v: float | str) -> tuple:
    """Sort key of variants: every α in order, then every threshold-route density."""
    return (0, v, "") if isinstance(v, float) else (1, 0.0, v)


def summarise(rows: list[dict[str, Any]], group: Callable[[dict[str, Any]], Hashable | None] | None = None
              ) -> dict[Any, dict[str, Any]]:
    """DEFT vs PEFT averages per α > 0 (and per threshold-route density, keyed ``"t<density>"``,
    :func:`variant`), over the (task, seed) pairs where both runs exist.

    Returns ``{alpha: {"methods": {method: {...}}, "seeds": {seed: {...}}, "overall": {...}}}``; each
    leaf has ``pairs``, ``density_reduction_pct`` (relative, %) and ``metric_delta`` (points);
    ``overall`` adds ``metric_delta_seed_sd`` and ``metric_delta_se`` (over seeds; None for one seed).
    A pair is one (task, method, seed): the DEFT run against the PEFT run of the same seed.
    ``group(row)`` replaces the variant as the key of a DEFT row (``None``: leave the row out), e.g.
    to pool the α chosen per task.
    """
    by = {(r["task"], r["method"], variant(r), int(r.get("seed", 0))): r for r in rows}
    pairs: dict[Any, list[tuple[str, int, float, float]]] = {}
    for (task, method, v, seed), r in by.items():
        base = by.get((task, method, 0.0, seed))
        key = v if group is None else group(r)
        if v == 0.0 or base is None or key is None:
            continue
        pairs.setdefault(key, []).append((method, seed, reduction(base["density"], r["density"]),
                                          r["metric"]["value"] - base["metric"]["value"]))

    def leaf(items: list[tuple[str, int, float, float]]) -> dict[str, float]:
        return {
            "pairs": len(items),
            "density_reduction_pct": fmean([i[2] for i in items]),
            "metric_delta": fmean([i[3] for i in items]),
        }

    out: dict[float, dict[str, Any]] = {}
    for alpha, items in sorted(pairs.items(), key=lambda kv: variant_order(kv[0]) if group is None else str(kv[0])):
        methods = {m: leaf([i for i in items if i[0] == m]) for m in sorted({i[0] for i in items})}
        seeds = {sd: leaf([i for i in items if i[1] == sd]) for sd in sorted({i[1] for i in items})}
        overall = leaf(items)
        overall["metric_delta_seed_sd"] = sample_sd([v["metric_delta"] for v in seeds.values()])
        # seed-to-seed noise only (not dev-set sampling); sd/√n is the SE of the pooled mean when every
        # seed has the same pairs, as in a finished grid. None for one seed.
        overall["metric_delta_se"] = overall["metric_delta_seed_sd"] / len(seeds) ** 0.5 if len(seeds) > 1 else None
        out[alpha] = {"methods": methods, "seeds": seeds, "overall": overall}
    return out


def _meets(s: dict[str, float]) -> bool:
    return s["density_reduction_pct"] >= 40 and s["metric_delta"] >= -1


def reduction(peft: float, deft: float) -> float:
    """Relative reduction of DEFT's value against PEFT's, in percent (0 when PEFT's is 0)."""
    return 100.0 * (peft - deft) / peft if peft else 0.0


def density_change(reduction_pct: float) -> str:
    """A density reduction as a signed change: 44.2 -> ``−44.2``, a rise of 5 (-5.0) -> ``+5.0``."""
    return f"−{reduction_pct:.1f}" if reduction_pct >= 0 else f"+{-reduction_pct:.1f}"


def summary_lines(title: str, summary: dict[str, Any]) -> list[str]:
    """A ``## title`` section: one row per method and the overall line of a :func:`summarise` entry."""
    o = summary["overall"]
    lines = [
        "",
        f"## {title}",
        "",
        "| method | pairs | density reduction | metric change (points) | meets ≥40% and ≤1 pt |",
        "|---|---|---|---|---|",
    ]
    for method, m in summary["methods"].items():
        lines.append(
            f"| {method} | {m['pairs']} | {m['density_reduction_pct']:.1f}% | {m['metric_delta']:+.2f} | "
            f"{'yes' if _meets(m) else 'no'} |"
        )
    per_seed = ", ".join(
        f"seed {sd}: {density_change(v['density_reduction_pct'])}% / {v['metric_delta']:+.2f}" for sd, v in summary["seeds"].items()
    )
    return lines + [
        "",
        f"All {o['pairs']} pairs: density {density_change(o['density_reduction_pct'])}%, metric {o['metric_delta']:+.2f} "
        f"points ({'meets' if _meets(o) else 'misses'} ≥ 40% and ≤ 1 point). Per seed: {per_seed} "
        f"(sd of the seed means {o['metric_delta_seed_sd']:.2f} points"
        + (f"; standard error of the mean over {len(summary['seeds'])} seeds {o['metric_delta_se']:.2f} points"
           if o["metric_delta_se"] is not None else "")
        + ").",
    ]
