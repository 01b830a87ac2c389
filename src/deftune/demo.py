"""The main job (``deftune demo`` / ``make demo``): PEFT vs DEFT on SST-2 with MiniLM + LoRA.

Both runs share every setting but α (PEFT: α = 0) and go through the same code path. The recipe
(documented in ``docs/recipe.md``) was chosen by measurement; see that page for what was tried.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deftune.compare.pairs import density_change, reduction
from deftune.runs import RunResult, write_json_atomic
from deftune.train.config import TrainConfig


@dataclass
class DemoConfig:
    """The demo's settings (the DEFT recipe lives in ``deft``; PEFT is the same with alpha=0).

    Attributes:
        data_dir: GLUE folder holding SST-2/ (default: $DEFTUNE_DATA_DIR, else the Hub).
        output_dir: where the two run directories, results.json and the plot go.
        steps: optimizer steps of each run.
        train_subset: the fixed training subset size (examples of SST-2 train).
        alpha: DEFT's density-loss weight.
        seed: random seed (same for both runs).
        model: the encoder (default: the packaged all-MiniLM-L6-v2).
    """

    data_dir: str | None = None
    output_dir: str = "runs/demo"
    steps: int = 250
    train_subset: int = 8000
    alpha: float = 0.125
    seed: int = 0
    model: str = "minilm"
    recipe: dict[str, Any] = field(
        default_factory=lambda: {
            "method": "lora",
            "method_options": {
                "target_modules": ["query", "value", "intermediate.dense"],
                "lora_dropout": 0.0,
                "act_scale": "layer",
            },
            "schedule": "linear",
            "warmup_steps": 100,
            "batch_size": 32,
            "lr": 2e-3,
            "scale_lr": 0.1,
            "max_length": 64,
        }
    )

    def __post_init__(self) -> None:
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"alpha must be a number > 0 (the DEFT run's density-loss weight), got {self.alpha!r}")
        self.run_config("deft", self.alpha)  # TrainConfig's checks (steps, subset, model ...) where the demo enters

    def run_config(self, name: str, alpha: float) -> TrainConfig:
        return TrainConfig(
            task="sst2",
            model=self.model,
            alpha=alpha,
            steps=self.steps,
            train_subset=self.train_subset,
            data_dir=self.data_dir,
            output_dir=str(Path(self.output_dir) / name),
            seed=self.seed,
            name=name,
            **self.recipe,
        )


def run_demo(config: DemoConfig, *, progress: bool = True) -> dict[str, Any]:
    """Train PEFT and DEFT, print a side-by-side table, write ``results.json`` and a plot."""
    from deftune.hardware import describe
    from deftune.train import train_glue

    results: list[RunResult] = []
    for name, alpha in (("peft", 0.0), ("deft", config.alpha)):
        results.append(train_glue(config.run_config(name, alpha), progress=progress))
    peft, deft = results
    summary = {
        "task": "sst2",
        "model": "minilm (all-MiniLM-L6-v2)" if config.model == "minilm" else config.model,
        "config": dataclasses.asdict(config),
        "hardware": describe(),
        "runs": [r.to_dict() for r in results],
        "density_reduction_pct": reduction(peft.density["exact"], deft.density["exact"]),
        "metric_delta": deft.metric["value"] - peft.metric["value"],
    }
    out = Path(config.output_dir)
    write_json_atomic(out / "results.json", summary)
    plot_per_layer(results, out / "density_per_layer.png")
    print(format_table(peft, deft))
    print(f"\nwrote {out / 'results.json'} and {out / 'density_per_layer.png'}")
    return summary


def format_table(peft: RunResult, deft: RunResult) -> str:
    """Side-by-side text table of the two runs."""
    rows: list[tuple[str, str, str, str]] = []
    name = peft.metric["name"]
    rows.append((f"dev {name}", f"{peft.metric['value']:.2f}", f"{deft.metric['value']:.2f}",
                 f"{deft.metric['value'] - peft.metric['value']:+.2f} pt"))
    rows.append(("exact density (fp32)", f"{peft.density['exact']:.4f}", f"{deft.density['exact']:.4f}",
                 f"{density_change(reduction(peft.density['exact'], deft.density['exact']))}%"))
    for layer in peft.density["per_layer"]:
        p, d = peft.density["per_layer"][layer], deft.density["per_layer"][layer]
        rows.append((f"  {layer}", f"{p:.4f}", f"{d:.4f}", f"{density_change(reduction(p, d))}%"))
    for tau, pv in peft.thresholded.items():
        dv = deft.thresholded[tau]
        rows.append((f"density |a|>{tau}", f"{pv['density']:.4f}", f"{dv['density']:.4f}",
                     f"{density_change(reduction(pv['density'], dv['density']))}%"))
        rows.append((f"  {name}, |a|<={tau} zeroed", f"{pv['metric']:.2f}", f"{dv['metric']:.2f}",
                     f"{dv['metric'] - pv['metric']:+.2f} pt"))
    rows.append(("train time (s)", f"{peft.train_seconds:.0f}", f"{deft.train_seconds:.0f}",
                 f"x{deft.train_seconds / max(peft.train_seconds, 1e-9):.2f}"))
    widths = [max(len(r[i]) for r in rows + [("", "PEFT (a=0)", f"DEFT (a={deft.alpha:g})", "change")]) for i in range(4)]
    head = ("", "PEFT (a=0)", f"DEFT (a={deft.alpha:g})", "change")
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths)))]
    lines.append("-" * len(lines[0]))
    for r in rows:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(lines)


def plot_per_layer(results: list[RunResult], path: Path) -> None:
    """Bar plot of per-layer exact density, one bar group per layer."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib.pyplot as plt

    layers = list(results[0].density["per_layer"])
    width = 0.8 / len(results)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for i, r in enumerate(results):
        xs = [j + i * width for j in range(len(layers))]
        label = f"{r.name} (a={r.alpha:g}): {r.density['exact']:.3f}, {r.metric['name']} {r.metric['value']:.1f}"
        ax.bar(xs, [r.density["per_layer"][k] for k in layers], width, label=label)
    ax.set_xticks([j + width * (len(results) - 1) / 2 for j in range(len(layers))], layers)
    ax.set_ylabel("exact density (fp32, real tokens)")
    ax.set_ylim(0, 1.05)
    ax.set_title("MLP activation density per layer, SST-2 dev")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
