"""Choose α per task on held-out training data, then read the dev results at that α.

The GLUE dev sets are where results are reported, so an α picked by looking at them is optimistic
(the classic hyper-parameter selection bias). The honest route, which this module implements:

1. run the grid scored on training examples held out of training
   (``deftune compare --holdout N --results-json HOLDOUT.json``; every run holds out the same
   ``N`` examples, :func:`deftune.data.glue.split_holdout`);
2. :func:`select_alphas`: for each task, the **largest** α whose mean held-out metric change against
   PEFT (over methods and seeds; each DEFT run against the PEFT run of the same method and seed) is
   no worse than ``-tolerance`` points; if no α qualifies, the α that loses least. Larger α means
   sparser activations, so this is "as sparse as the held-out metric allows";
3. :func:`selection_lines` (``deftune compare --select-alpha-from HOLDOUT.json``): the dev-set
   pairs at the chosen α of each task, pooled over tasks, methods and seeds.

The rule and the tolerance are fixed before the dev numbers are read; the dev grid must contain
every candidate α (it is only read, never re-run).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from deftune.compare.report import summarise, summary_lines


@dataclass(frozen=True)
class AlphaChoice:
    """The α chosen for one task, and what every candidate did on the held-out examples.

    Attributes:
        task: GLUE task.
        alpha: the chosen α.
        within_tolerance: whether the chosen α met the tolerance (else it is the least-bad one).
        candidates: α -> (held-out metric change in points, density reduction in %, pairs).
    """

    task: str
    alpha: float
    within_tolerance: bool
    candidates: dict[float, tuple[float, float, int]]


def select_alphas(holdout_rows: list[dict[str, Any]], tolerance: float = 1.0) -> dict[str, AlphaChoice]:
    """Per task, the largest α whose mean held-out metric change is ``>= -tolerance`` (see module doc)."""
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance!r}")
    not_holdout = sorted({r["task"] for r in holdout_rows if r.get("eval_split", "dev") != "holdout"})
    if not_holdout:
        raise ValueError(
            f"rows of {not_holdout} were scored on the dev set: choose α on a grid run with --holdout N "
            "(and its own --results-json)"
        )
    choices: dict[str, AlphaChoice] = {}
    for task in sorted({r["task"] for r in holdout_rows}):
        summary = summarise([r for r in holdout_rows if r["task"] == task])
        if not summary:
            raise ValueError(f"task {task!r}: the held-out grid needs α = 0 (PEFT) and at least one α > 0 per method")
        candidates = {
            float(a): (s["overall"]["metric_delta"], s["overall"]["density_reduction_pct"], s["overall"]["pairs"])
            for a, s in summary.items()
        }
        passing = [a for a, (delta, _, _) in candidates.items() if delta >= -tolerance]
        alpha = max(passing) if passing else max(candidates, key=lambda a: (candidates[a][0], -a))
        choices[task] = AlphaChoice(task, alpha, bool(passing), candidates)
    return choices


def selected_summary(dev_rows: list[dict[str, Any]], choices: dict[str, AlphaChoice]) -> dict[str, Any] | None:
    """:func:`deftune.compare.report.summarise` of the dev pairs at each task's chosen α (None: no pairs)."""
    missing = sorted(t for t in {r["task"] for r in dev_rows} - set(choices))
    if missing:
        raise ValueError(f"no α was chosen for tasks {missing}: the held-out grid lacks them")
    out = summarise(dev_rows, group=lambda r: "chosen" if float(r["alpha"]) == choices[r["task"]].alpha else None)
    return out.get("chosen")


def selection_lines(dev_rows: list[dict[str, Any]], holdout_rows: list[dict[str, Any]], source: str,
                    tolerance: float) -> list[str]:
    """The report section: the choice per task (with every candidate) and the dev results at it."""
    dev_tasks = {r["task"] for r in dev_rows}
    choices = {t: c for t, c in select_alphas(holdout_rows, tolerance).items() if t in dev_tasks}
    held = sorted({int(r["holdout"]) for r in holdout_rows if "holdout" in r})
    lines = [
        "",
        "## α chosen per task on held-out training data",
        "",
        f"From `{source}`: the same grid scored on {', '.join(map(str, held)) or '?'} training examples held out "
        f"of training. Rule (fixed before reading the dev results): per task, the largest α whose mean held-out "
        f"metric change against PEFT is ≥ −{tolerance:g} points, else the α that loses least.",
        "",
        "| task | held-out: α → metric change / density reduction (pairs) | chosen α |",
        "|---|---|---|",
    ]
    for task, c in choices.items():
        cells = "; ".join(f"{a:g} → {d:+.2f} / −{r:.1f}% ({n})" for a, (d, r, n) in sorted(c.candidates.items()))
        lines.append(f"| {task} | {cells} | {c.alpha:g}{'' if c.within_tolerance else ' (none within tolerance)'} |")
    summary = selected_summary([r for r in dev_rows if r["task"] in choices], choices)
    if summary is None:
        return lines + ["", "The dev grid has no runs at the chosen α values."]
    return lines + summary_lines("Dev results at the chosen α, averaged over tasks and seeds", summary)
