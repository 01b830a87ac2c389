"""PEFT vs DEFT over tasks × methods (``deftune compare``) and the α sweep (``deftune sweep alpha``).

Modules: :mod:`.grid` (config and resumable runner), :mod:`.report` (pairs, tables, plot),
:mod:`.select_alpha` (α chosen on held-out training data), :mod:`.sweep` (the α sweep).

Both are resumable grids of :func:`deftune.train.train_glue` runs (and, for the task ``squad``,
of :func:`deftune.generative.train_generative` runs: greedy-decoding QA, metric F1, density of the
teacher-forced pass):

* every finished run is a row in the results JSON (``docs/results/glue.json`` by default),
  keyed by (task, method, alpha, steps, seed, eval split, threshold density); a key already
  present is skipped;
* several workers may run the same command at once (one per core): runs are claimed and rows
  appended under file locks (:func:`run_grid`);
* the JSON is rewritten atomically after each run, so an interruption loses at most the run in
  progress, whose half-written run directory is removed and restarted on the next invocation;
* tables and plots are regenerated from the JSON at the end (and can be alone: ``--report-only``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deftune.compare.grid import (
    METHOD_LR,
    ROW_BUILDERS,
    SQUAD,
    CompareConfig,
    RunConfig,
    check_recipes,
    check_writable,
    config_key,
    load_rows,
    run_grid,
    run_key,
)
from deftune.compare.pairs import summarise, summary_lines
from deftune.compare.report import NOTES_MARKER, SUMMARY_MARKERS, write_compare_report
from deftune.compare.sweep import AlphaSweepConfig, plot_alpha_sweep, run_alpha_sweep
from deftune.data.glue import check_local_tasks
from deftune.train.config import TrainConfig


def run_compare(config: CompareConfig, *, progress: bool = True) -> list[dict[str, Any]]:
    """Run (or resume) the grid, then write the markdown report and plot."""
    for path in (config.results_json, config.report_md):  # before anything trains
        if path:
            check_writable(path)
    check_local_tasks([t for t in config.tasks if t != SQUAD], config.data_dir)
    rows = run_grid(config.runs(), config.results_json, progress=progress)
    write_compare_report(rows, config)
    return rows


def report_compare(config: CompareConfig) -> list[dict[str, Any]]:
    """Rewrite the report and plot from the results file alone (nothing trains), after checking
    that its runs were trained with this config's recipe, which the report describes."""
    if not Path(config.results_json).is_file():
        raise FileNotFoundError(f"{config.results_json} does not exist: --report-only rewrites the report of an "
                                "existing results file (check --results-json)")
    check_recipes(config.runs(), config.results_json)
    rows = load_rows(config.results_json)
    write_compare_report(rows, config)
    return rows


__all__ = [
    "METHOD_LR", "NOTES_MARKER", "ROW_BUILDERS", "SQUAD", "SUMMARY_MARKERS", "AlphaSweepConfig", "CompareConfig", "RunConfig",
    "TrainConfig", "check_recipes", "config_key", "load_rows", "plot_alpha_sweep", "run_alpha_sweep", "run_compare", "run_grid",
    "report_compare", "run_key", "summarise", "summary_lines", "write_compare_report",
]
