"""Choose α per task on other data than the reported runs, then read the dev results at that α.

The GLUE dev sets are where results are reported, so an α picked by looking at them is optimistic
(the classic hyper-parameter selection bias). Two routes, both implemented here:

* **held-out training data** (the clean one): run the grid scored on training examples held out of
  training (``deftune compare --holdout N --results-json HOLDOUT.json``; every run holds out the
  same ``N`` examples, :func:`deftune.data.glue.split_holdout`) and choose on it;
* **the dev results of other seeds** (choose on seeds 0–4, report seeds 5–9): the choice then never
  sees the training randomness of the reported runs, but it has seen the same dev examples, so it
  guards against seed luck, not against fitting the dev set. The seeds must be disjoint.

:func:`select_alphas`: for each task, the **largest** α whose mean metric change against PEFT on the
selection rows (over methods and seeds; each DEFT run against the PEFT run of the same method and
seed) is no worse than ``-tolerance`` points; if no α qualifies, the α that loses least. Larger α
means sparser activations, so this is "as sparse as the selection data allow".
:func:`selection_lines` (``deftune compare --select-alpha-from FILE``): the dev-set pairs at the
chosen α of each task, pooled over tasks, methods and seeds.

The rule and the tolerance are fixed before the reported numbers are read; the reported grid must
contain every chosen α (it is only read, never re-run).
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


def _seeds(rows: list[dict[str, Any]]) -> set[int]:
    return {int(r.get("seed", 0)) for r in rows}


def select_alphas(holdout_rows: list[dict[str, Any]], tolerance: float = 1.0,
                  report_seeds: set[int] | None = None) -> dict[str, AlphaChoice]:
    """Per task, the largest α whose mean metric change on ``holdout_rows`` is ``>= -tolerance``
    (see module doc). Rows scored on the dev set are accepted only when ``report_seeds`` (the seeds
    of the reported runs) is given and shares no seed with them."""
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance!r}")
    dev = [r for r in holdout_rows if r.get("eval_split", "dev") != "holdout"]
    if dev and len(dev) != len(holdout_rows):
        raise ValueError("the selection rows mix held-out and dev scores: choose α on one kind of grid")
    if dev and (report_seeds is None or _seeds(dev) & set(report_seeds)):
        shared = sorted(_seeds(dev) & set(report_seeds or ()))
        raise ValueError(
            f"rows of {sorted({r['task'] for r in dev})} were scored on the dev set"
            + (f" with the reported seeds {shared}" if shared else "")
            + ": choose α on a grid run with --holdout N (and its own --results-json), or on the dev "
            "results of other seeds than the reported ones"
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
    choices = {t: c for t, c in select_alphas(holdout_rows, tolerance, _seeds(dev_rows)).items() if t in dev_tasks}
    held = sorted({int(r["holdout"]) for r in holdout_rows if "holdout" in r})
    rule = (f"Rule (fixed before reading the reported results): per task, the largest α whose mean {{}} "
            f"against PEFT is ≥ −{tolerance:g} points, else the α that loses least.")
    if held:
        title, kind, change = "held-out training data", "held-out", "held-out metric change"
        what = f"the same grid scored on {', '.join(map(str, held))} training examples held out of training"
    else:
        title, kind, change = "the dev results of other seeds", "selection seeds", "metric change on those seeds"
        what = (f"dev results of seeds {', '.join(map(str, sorted(_seeds(holdout_rows))))}, none of them reported "
                "here (the choice has not seen these runs, but it has seen the same dev examples)")
    lines = [
        "",
        f"## α chosen per task on {title}",
        "",
        f"From `{source}`: {what}. {rule.format(change)}",
        "",
        f"| task | {kind}: α → metric change / density reduction (pairs) | chosen α |",
        "|---|---|---|",
    ]
    for task, c in choices.items():
        cells = "; ".join(f"{a:g} → {d:+.2f} / −{r:.1f}% ({n})" for a, (d, r, n) in sorted(c.candidates.items()))
        lines.append(f"| {task} | {cells} | {c.alpha:g}{'' if c.within_tolerance else ' (none within tolerance)'} |")
    summary = selected_summary([r for r in dev_rows if r["task"] in choices], choices)
    if summary is None:
        return lines + ["", "The dev grid has no runs at the chosen α values."]
    return lines + summary_lines("Dev results at the chosen α, averaged over tasks and seeds", summary)
