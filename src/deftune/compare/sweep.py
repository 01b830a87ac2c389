"""``deftune sweep alpha``: one task and method over several α, and the sweet-spot plot."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deftune.act_scale import ACT_SCALES
from deftune.compare.grid import CompareConfig, config_key, run_grid, run_key
from deftune.compare.report import save_figure


@dataclass
class AlphaSweepConfig:
    """The α sweep on one task and method.

    Attributes:
        task: GLUE task.
        method: PEFT method.
        alphas: the α values.
        steps: optimizer steps per run.
        train_subset: training examples (fixed subset).
        schedule: alpha schedule.
        warmup_steps: alpha warm-up steps.
        data_dir: GLUE folder.
        runs_dir: where run directories go (None: ``runs/compare/<results file stem>-<hash of its path>``, so sweeps
            with results files of their own never share run folders).
        results_json: results file (resumable).
        plot: output PNG.
        seed: random seed.
        model: the model fine-tuned.
        act_scale: learned activation scales (as in :class:`CompareConfig`).
        scale_lr: learning rate of those scales.
        head_lr: learning rate of the task head (None: the method's).
    """

    task: str = "sst2"
    method: str = "lora"
    alphas: tuple[float, ...] = (0.0, 0.03, 0.1, 0.3, 1.0)
    steps: int = 250
    train_subset: int | None = 8000
    schedule: str = "linear"
    warmup_steps: int = 100
    data_dir: str | None = None
    runs_dir: str | None = None
    results_json: str = "docs/results/sweep_alpha.json"
    plot: str = "docs/img/sweep_alpha.png"
    seed: int = 0
    model: str = "minilm"
    act_scale: str = field(default="layer", metadata={"choices": ACT_SCALES})
    scale_lr: float = 0.1
    head_lr: float | None = 5e-3

    def __post_init__(self) -> None:
        self.compare_config()  # the grid's checks, where the sweep's config enters

    def compare_config(self) -> CompareConfig:
        """The one-task, one-method grid this sweep runs."""
        return CompareConfig(
            tasks=(self.task,), methods=(self.method,), alphas=self.alphas, steps=self.steps,
            train_subset=self.train_subset, schedule=self.schedule, warmup_steps=self.warmup_steps,
            data_dir=self.data_dir, runs_dir=self.runs_dir, results_json=self.results_json, seeds=(self.seed,),
            model=self.model, act_scale=self.act_scale, scale_lr=self.scale_lr, head_lr=self.head_lr,
        )


def run_alpha_sweep(config: AlphaSweepConfig, *, progress: bool = True) -> list[dict[str, Any]]:
    """Train (or reuse) every α run of ``config``, then plot the metric and density against α."""
    grid = config.compare_config()
    runs = grid.runs()
    rows = run_grid(runs, config.results_json, progress=progress)
    wanted = {config_key(c) for c in runs}  # this sweep's runs only: the file may hold other seeds
    rows = [r for r in rows if run_key(r) in wanted]
    plot_alpha_sweep(rows, Path(config.plot))
    return rows


def plot_alpha_sweep(rows: list[dict[str, Any]], path: Path) -> None:
    """The sweet-spot plot: task metric and exact density against α (one point per run)."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r["alpha"])
    xs = list(range(len(rows)))
    fig, ax1 = plt.subplots(figsize=(6, 3.5))
    ax1.plot(xs, [r["metric"]["value"] for r in rows], "o-", color="tab:blue")
    ax1.set_ylabel(f"dev {rows[0]['metric']['name']}" if rows else "metric", color="tab:blue")
    ax2 = ax1.twinx()
    ax2.plot(xs, [r["density"] for r in rows], "s--", color="tab:red")
    ax2.set_ylabel("exact density", color="tab:red")
    ax1.set_xticks(xs, [f"{r['alpha']:g}" for r in rows])
    ax1.set_xlabel("alpha")
    if rows:
        ax1.set_title(f"alpha sweep: {rows[0]['task']}, {rows[0]['method']}")
    fig.tight_layout()
    save_figure(fig, path)
