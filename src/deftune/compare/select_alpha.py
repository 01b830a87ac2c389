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

from deftune.compare.pairs import summarise, summary_lines, variant


@dataclass(frozen=True)
class AlphaChoice:
    """The α chosen for one task, and what every candidate did on the selection rows.

    Attributes:
        task: GLUE task.
        alpha: the chosen α.
        within_tolerance: whether the chosen α met the tolerance (else it is the least-bad one).
        candidates: α -> (metric change on the selection rows in points, density reduction in %, pairs).
    """

    task: str
    alpha: float
    within_tolerance: bool
    candidates: dict[float, tuple[float, float, int]]


def _seeds(rows: list[dict[str, Any]]) -> set[int]:
    return {int(r.get("seed", 0)) for r in rows}


def _is_holdout(row: dict[str, Any]) -> bool:
    return row.get("eval_split", "dev") == "holdout"


def _check_selection_rows(rows: list[dict[str, Any]], report_seeds: set[int] | None) -> None:
    """Held-out rows are always fit to choose on; dev rows only when none of their seeds is reported."""
    dev = [r for r in rows if not _is_holdout(r)]
    if dev and len(dev) != len(rows):
        raise ValueError(
            f"the selection rows mix {len(rows) - len(dev)} held-out and {len(dev)} dev-scored runs: choose α on "
            "one kind of grid (a --holdout grid, or dev results of other seeds)"
        )
    if not dev:
        return
    shared = sorted(_seeds(dev) & {int(s) for s in report_seeds or ()})
    if report_seeds is None or shared:
        raise ValueError(
            f"rows of {sorted({r['task'] for r in dev})} were scored on the dev set"
            + (f" with the reported seeds {shared}" if shared else "")
            + ": choose α on a grid run with --holdout N (and its own --results-json), or on the dev results of "
            "other seeds than the reported ones"
            + (" (pass report_seeds, the seeds of the reported runs)" if report_seeds is None else "")
        )


def select_alphas(holdout_rows: list[dict[str, Any]], tolerance: float = 1.0,
                  report_seeds: set[int] | None = None) -> dict[str, AlphaChoice]:
    """Per task, the largest α whose mean metric change on ``holdout_rows`` is ``>= -tolerance``
    (see module doc). Rows scored on the dev set are accepted only when ``report_seeds`` (the seeds
    of the reported runs) is given and shares no seed with them. Threshold-route rows
    (``act_threshold_density``) are not α candidates and are left out."""
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance!r}")
    rows = [r for r in holdout_rows if isinstance(variant(r), float)]
    _check_selection_rows(rows, report_seeds)
    choices: dict[str, AlphaChoice] = {}
    for task in sorted({r["task"] for r in rows}):
        summary = summarise([r for r in rows if r["task"] == task])
        if not summary:
            raise ValueError(f"task {task!r}: the selection grid needs α = 0 (PEFT) and at least one α > 0 per method")
        candidates = {
            float(a): (s["overall"]["metric_delta"], s["overall"]["density_reduction_pct"], s["overall"]["pairs"])
            for a, s in summary.items()
        }
        passing = [a for a, (delta, _, _) in candidates.items() if delta >= -tolerance]
        alpha = max(passing) if passing else max(candidates, key=lambda a: (candidates[a][0], -a))
        choices[task] = AlphaChoice(task, alpha, bool(passing), candidates)
    return choices


def missing_at_choice(dev_rows: list[dict[str, Any]], choices: dict[str, AlphaChoice]) -> list[tuple[str, str, int]]:
    """(task, method, seed) of every PEFT run in ``dev_rows`` whose twin at the task's chosen α is
    absent — pairs the pooled average cannot contain (a grid not yet finished, or never run)."""
    def key(r: dict[str, Any]) -> tuple[str, str, int]:
        return r["task"], r["method"], int(r.get("seed", 0))

    have = {key(r) for r in dev_rows if r["task"] in choices and variant(r) == choices[r["task"]].alpha}
    return sorted({key(r) for r in dev_rows if variant(r) == 0.0} - have)


def selected_summary(dev_rows: list[dict[str, Any]], choices: dict[str, AlphaChoice]) -> dict[str, Any] | None:
    """:func:`deftune.compare.pairs.summarise` of the dev pairs at each task's chosen α (None: no pairs).

    Raises if a task of ``dev_rows`` has no α chosen; PEFT runs without a run at the chosen α are
    left out of the pairs (list them with :func:`missing_at_choice`)."""
    rows = [r for r in dev_rows if isinstance(variant(r), float)]
    missing = sorted({r["task"] for r in rows} - set(choices))
    if missing:
        raise ValueError(f"no α was chosen for tasks {missing}: the selection grid lacks them")
    out = summarise(rows, group=lambda r: "chosen" if float(r["alpha"]) == choices[r["task"]].alpha else None)
    return out.get("chosen")


def selection_lines(dev_rows: list[dict[str, Any]], holdout_rows: list[dict[str, Any]], source: str,
                    tolerance: float) -> list[str]:
    """The report section: the choice per task (with every candidate) and the dev results at it."""
    dev_tasks = {r["task"] for r in dev_rows}
    # every reported task must have a choice (selected_summary raises otherwise); choices for tasks
    # this grid does not have are not shown
    choices = {t: c for t, c in select_alphas(holdout_rows, tolerance, _seeds(dev_rows)).items() if t in dev_tasks}
    rule = (f"Rule: per task, the largest α whose mean {{}} against PEFT is ≥ −{tolerance:g} points, else the α "
            "that loses least.")
    if any(_is_holdout(r) for r in holdout_rows):
        held = sorted({int(r["holdout"]) for r in holdout_rows if "holdout" in r})
        title, kind, change = "held-out training data", "held-out", "held-out metric change"
        what = f"the same grid scored on {', '.join(map(str, held)) or 'some'} training examples held out of training"
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
    summary = selected_summary(dev_rows, choices)
    absent = missing_at_choice(dev_rows, choices)
    note = [] if not absent else [
        "",
        f"Not in the average: {len(absent)} PEFT runs have no run at their task's chosen α yet ("
        + ", ".join(f"{t} {m} seed {sd}" for t, m, sd in absent[:10]) + (", …" if len(absent) > 10 else "") + ").",
    ]
    if summary is None:
        return lines + ["", "The dev grid has no runs at the chosen α values."] + note
    return lines + summary_lines("Dev results at the chosen α, averaged over tasks and seeds", summary) + note
