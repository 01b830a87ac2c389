"""PEFT vs DEFT over tasks × methods (``deftune compare``) and the α sweep (``deftune sweep alpha``).

Both are resumable grids of :func:`deftune.train.train_glue` runs (and, for the task ``squad``,
of :func:`deftune.generative.train_generative` runs: greedy-decoding QA, metric F1, density of the
teacher-forced pass):

* every finished run is a row in the results JSON (``docs/results/glue.json`` by default),
  keyed by (task, method, alpha, steps, seed, eval split); a key already present is skipped;
* several workers may run the same command at once (one per core): runs are claimed and rows
  appended under file locks (:func:`run_grid`);
* the JSON is rewritten atomically after each run, so an interruption loses at most the run in
  progress, whose half-written run directory is removed and restarted on the next invocation;
* tables and plots are regenerated from the JSON at the end (and can be alone: ``--report-only``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Hashable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean, stdev
from typing import Any

from deftune.generative.config import GenConfig
from deftune.runs import RESULTS_FILE, file_lock, read_json, write_json_atomic
from deftune.train.config import TrainConfig

SQUAD = "squad"  # the generative task; every other task name is a GLUE task
RunConfig = TrainConfig | GenConfig

# Learning rates per method for the documented budget (virtual-token methods need larger ones,
# as in the PEFT papers; the DEFT paper's scripts tune them per task).
METHOD_LR: dict[str, float] = {
    "lora": 1e-3, "dora": 1e-3, "ia3": 5e-3, "prefix": 1e-2, "prompt": 3e-2, "ptuning": 1e-2,
    "adapter": 1e-3, "bitfit": 5e-3, "full": 5e-5,
}


@dataclass
class CompareConfig:
    """A grid of runs: every task × method × alpha.

    Attributes:
        tasks: GLUE tasks.
        methods: PEFT methods (names from deftune.methods.METHODS).
        alphas: density-loss weights; 0 is PEFT.
        steps: optimizer steps per run (the documented training budget).
        train_subset: training examples per task (fixed random subset; None: all).
        eval_subset: dev examples per task (None: the full dev set).
        batch_size: batch size.
        max_length: max tokens per example.
        schedule: alpha schedule of the DEFT runs.
        warmup_steps: alpha warm-up steps.
        data_dir: GLUE folder.
        runs_dir: where run directories go.
        results_json: the results file (one row per run; resumable).
        report_md: the markdown report written from the results file.
        seeds: random seeds; every (task, method, α) runs once per seed and the report averages
            over seeds (the small GLUE dev sets make one seed's average swing by about a point).
        model: the model every run fine-tunes.
        act_scale: learned activation scales for every method (``none``, ``layer``, ``neuron``;
            see :mod:`deftune.act_scale`): PEFT and DEFT runs both carry them.
        scale_lr: learning rate of those scales.
        head_lr: learning rate of the task head (None: the method's learning rate). A head that
            starts at zero needs more than 1e-3 to reach STS-B's 0–5 label range in 250 steps.
        method_options: per-method overrides of :class:`deftune.methods.MethodConfig`.
        generative_model: the model of the ``squad`` runs (``smollm2``; ``tiny-llama`` etc. for tests).
        squad_dir: SQuAD folder or JSON file of the ``squad`` runs (else ``$DEFTUNE_SQUAD_DIR``).
        holdout: None (score on the dev sets), or score every GLUE run on this many training
            examples held out of its training data (a fixed draw, :func:`deftune.data.glue.split_holdout`)
            — the grid for choosing α without the dev sets; use a results file of its own.
        select_alpha_from: a results file of a ``holdout`` grid; the report then adds the dev results
            at the α chosen per task on it (:func:`deftune.select_alpha.select_alphas`).
        select_tolerance: the most held-out metric points the chosen α may lose against PEFT.
        generative_options: further :class:`deftune.generative.GenConfig` fields of the ``squad``
            runs (``batch_size=8,eval_questions=1000,act_threshold_density=0.58`` …); ``steps``
            and the seed come from this grid, the rest from ``GenConfig``'s defaults. A results
            file is keyed by (task, method, α, steps, seed) only: runs with other options (here or
            in the GLUE fields) need a results file of their own.
    """

    tasks: tuple[str, ...] = ("sst2", "mrpc", "rte", "stsb")
    methods: tuple[str, ...] = ("lora", "dora", "ia3", "prefix", "prompt", "adapter", "bitfit")
    alphas: tuple[float, ...] = (0.0, 0.1)
    steps: int = 250
    train_subset: int | None = 8000
    eval_subset: int | None = None
    batch_size: int = 32
    max_length: int = 128
    schedule: str = "linear"
    warmup_steps: int = 100
    data_dir: str | None = None
    runs_dir: str = "runs/compare"
    results_json: str = "docs/results/glue.json"
    report_md: str = "docs/results.md"
    seeds: tuple[int, ...] = (0,)
    model: str = "minilm"
    act_scale: str = "layer"
    scale_lr: float = 0.1
    head_lr: float | None = 5e-3
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    generative_model: str = "smollm2"
    squad_dir: str | None = None
    generative_options: dict[str, Any] = field(default_factory=dict)
    holdout: int | None = None
    select_alpha_from: str | None = None
    select_tolerance: float = 1.0

    def __post_init__(self) -> None:
        from deftune.data.glue import get_task
        from deftune.generative.peft_methods import PEFT_METHODS

        for t in self.tasks:
            if t != SQUAD:
                get_task(t)
        if not self.methods:
            raise ValueError("methods must name at least one PEFT method")
        if SQUAD in self.tasks:
            generative = sorted(PEFT_METHODS) + ["full"]
            unsupported = [m for m in self.methods if m not in generative]
            if unsupported:
                raise ValueError(
                    f"methods {unsupported} have no generative (squad) version; squad runs accept {generative}: "
                    "run squad in a grid of its own with those methods"
                )
            fixed = sorted(set(self.generative_options) & {"model", "method", "alpha", "seed", "steps", "output_dir"})
            if fixed:
                raise ValueError(f"generative_options cannot set {fixed}: the grid sets them (use --steps, --seeds, ...)")
            self._squad_config("lora", 0.0, 0, "check")  # unknown or bad GenConfig options fail here
        if self.holdout is not None:
            if not (isinstance(self.holdout, int) and self.holdout > 0):
                raise ValueError(f"holdout must be a positive integer or None, got {self.holdout!r}")
            if SQUAD in self.tasks:
                raise ValueError("holdout applies to GLUE tasks (squad already scores held-out articles)")
        if not (isinstance(self.select_tolerance, (int, float)) and self.select_tolerance >= 0):
            raise ValueError(f"select_tolerance must be a number >= 0, got {self.select_tolerance!r}")
        if any(a < 0 for a in self.alphas):
            raise ValueError(f"alphas must be >= 0, got {self.alphas}")
        if not self.seeds or any(int(s) != s or s < 0 for s in self.seeds):
            raise ValueError(f"seeds must be one or more integers >= 0, got {self.seeds}")

    def _squad_config(self, method: str, alpha: float, seed: int, name: str) -> GenConfig:
        return GenConfig.from_dict({
            **self.generative_options, "model": self.generative_model, "method": method, "alpha": alpha,
            "seed": seed, "steps": self.steps, "data_dir": self.generative_options.get("data_dir", self.squad_dir),
            "output_dir": str(Path(self.runs_dir) / name),
        })

    def runs(self) -> list[RunConfig]:
        out: list[RunConfig] = []
        for seed in self.seeds:
            for task in self.tasks:
                for method in self.methods:
                    for alpha in self.alphas:
                        name = (f"{task}-{method}-a{alpha:g}" + (f"-s{seed}" if seed else "")
                                + (f"-h{self.holdout}" if self.holdout else ""))
                        if task == SQUAD:
                            out.append(self._squad_config(method, alpha, seed, name))
                            continue
                        out.append(
                            TrainConfig(
                                task=task, model=self.model, method=method, alpha=alpha, steps=self.steps,
                                method_options={"act_scale": self.act_scale, **self.method_options.get(method, {})},
                                lr=METHOD_LR.get(method, 1e-3), scale_lr=self.scale_lr, head_lr=self.head_lr,
                                batch_size=self.batch_size, max_length=self.max_length,
                                train_subset=self.train_subset, eval_subset=self.eval_subset, holdout=self.holdout,
                                schedule=self.schedule, warmup_steps=self.warmup_steps, data_dir=self.data_dir,
                                output_dir=str(Path(self.runs_dir) / name), seed=seed, name=name,
                            )
                        )
        return out


NOTES_MARKER = "<!-- notes: kept when the report is rewritten -->"


def run_key(row: dict[str, Any]) -> tuple:
    return (row["task"], row["method"], float(row["alpha"]), int(row["steps"]), int(row.get("seed", 0)),
            row.get("eval_split", "dev"))


def config_key(config: RunConfig) -> tuple:
    """The results-file key of a run config (as :func:`run_key` of its row)."""
    if isinstance(config, GenConfig):
        return (SQUAD, config.method, float(config.alpha), int(config.steps), int(config.seed), "dev")
    return (config.task, config.method, float(config.alpha), int(config.steps), int(config.seed), config.eval_split)


def _glue_row(config: TrainConfig, *, progress: bool) -> dict[str, Any]:
    from deftune.train import train_glue

    d = train_glue(config, progress=progress).to_dict()
    return {
        "task": config.task, "method": config.method, "alpha": config.alpha, "steps": config.steps,
        "seed": config.seed, "act_scale": config.method_options.get("act_scale", "none"),
        **({"eval_split": "holdout", "holdout": config.holdout} if config.holdout else {}),
        "metric": d["metric"], "metrics": d["metrics"],
        "density": d["density"]["exact"], "per_layer_density": d["density"]["per_layer"],
        "trainable_parameters": d["trainable_parameters"], "train_seconds": d["train_seconds"],
    }


def _squad_row(config: GenConfig, *, progress: bool) -> dict[str, Any]:
    from deftune.generative import train_generative

    result = train_generative(config)
    after = result.after.summary()
    return {
        "task": SQUAD, "method": config.method, "alpha": config.alpha, "steps": config.steps,
        "seed": config.seed, "act_scale": "none", "model": config.model,
        "metric": {"name": "f1", "value": after["f1"]},
        "metrics": {k: after[k] for k in ("exact_match", "f1", "questions", "density_prefill", "density_decode",
                                          "perplexity")},
        "density": after["density_teacher_forced"],
        "per_layer_density": {k: v["exact"] for k, v in result.after.density_teacher_forced["per_layer"].items()},
        "trainable_parameters": result.trainable_parameters, "train_seconds": result.train_seconds,
    }


# config type -> "train it and return its results row"
ROW_BUILDERS = {TrainConfig: _glue_row, GenConfig: _squad_row}


def load_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    if not Path(path).is_file():
        return []
    data = read_json(path)
    return list(data["runs"] if isinstance(data, dict) else data)


def _append_row(results_json: str, row: dict[str, Any]) -> None:
    """Add ``row`` to the results file under its lock, re-reading it first (other workers append too)."""
    from deftune.hardware import describe

    path = Path(results_json)
    with file_lock(path.with_name(f".{path.name}.lock")):
        rows = [r for r in load_rows(results_json) if run_key(r) != run_key(row)] + [row]
        write_json_atomic(results_json, {"hardware": describe(), "runs": rows})


def run_grid(configs: Sequence[RunConfig], results_json: str, *, progress: bool = True) -> list[dict[str, Any]]:
    """Train every config not yet in ``results_json``; append each finished run atomically.

    Several workers may run the same grid (same command, same results file) to use more cores:
    each run is claimed by a lock on ``<run dir>.lock`` while it trains (a run claimed by another
    worker is passed over), and rows are appended under a lock on ``.<results file name>.lock`` beside it. Locks
    die with their process, so a killed worker leaves nothing stale.
    """
    for i, config in enumerate(configs):
        name = config.run_name if isinstance(config, TrainConfig) else Path(config.output_dir or "squad").name
        out = Path(config.output_dir) if config.output_dir else None
        claim = file_lock(str(out) + ".lock", blocking=False) if out is not None else nullcontext(True)
        with claim as mine:
            if not mine:
                print(f"[{i + 1}/{len(configs)}] {name}: training in another worker, passed over")
                continue
            if config_key(config) in {run_key(r) for r in load_rows(results_json)}:  # re-read: others append
                print(f"[{i + 1}/{len(configs)}] {name}: done, skipped")
                continue
            if out is not None and out.exists() and not (out / RESULTS_FILE).exists():
                shutil.rmtree(out)  # an interrupted run: restart it cleanly
            print(f"[{i + 1}/{len(configs)}] {name}: training")
            _append_row(results_json, ROW_BUILDERS[type(config)](config, progress=progress))
    return load_rows(results_json)


def run_compare(config: CompareConfig, *, progress: bool = True) -> list[dict[str, Any]]:
    """Run (or resume) the grid, then write the markdown report and plot."""
    rows = run_grid(config.runs(), config.results_json, progress=progress)
    write_compare_report(rows, config)
    return rows


def _sd(values: Sequence[float]) -> float:
    """Sample standard deviation; 0 for a single value."""
    return stdev(values) if len(values) > 1 else 0.0


def summarise(rows: list[dict[str, Any]], group: Callable[[dict[str, Any]], Hashable | None] | None = None
              ) -> dict[Any, dict[str, Any]]:
    """DEFT vs PEFT averages per α > 0, over the (task, seed) pairs where both runs exist.

    Returns ``{alpha: {"methods": {method: {...}}, "seeds": {seed: {...}}, "overall": {...}}}``; each
    leaf has ``pairs``, ``density_reduction_pct`` (relative, %) and ``metric_delta`` (points).
    A pair is one (task, method, seed): the DEFT run against the PEFT run of the same seed.
    ``group(row)`` replaces the α as the key of a DEFT row (``None``: leave the row out), e.g. to
    pool the α chosen per task.
    """
    by = {(r["task"], r["method"], float(r["alpha"]), int(r.get("seed", 0))): r for r in rows}
    pairs: dict[Any, list[tuple[str, int, float, float]]] = {}
    for (task, method, alpha, seed), r in by.items():
        base = by.get((task, method, 0.0, seed))
        key = alpha if group is None else group(r)
        if alpha == 0 or base is None or key is None:
            continue
        reduction = 100 * (base["density"] - r["density"]) / base["density"]
        pairs.setdefault(key, []).append((method, seed, reduction, r["metric"]["value"] - base["metric"]["value"]))

    def leaf(items: list[tuple[str, int, float, float]]) -> dict[str, float]:
        return {
            "pairs": len(items),
            "density_reduction_pct": fmean([i[2] for i in items]),
            "metric_delta": fmean([i[3] for i in items]),
        }

    out: dict[float, dict[str, Any]] = {}
    for alpha, items in sorted(pairs.items()):
        methods = {m: leaf([i for i in items if i[0] == m]) for m in sorted({i[0] for i in items})}
        seeds = {sd: leaf([i for i in items if i[1] == sd]) for sd in sorted({i[1] for i in items})}
        overall = leaf(items)
        overall["metric_delta_seed_sd"] = _sd([v["metric_delta"] for v in seeds.values()])
        out[alpha] = {"methods": methods, "seeds": seeds, "overall": overall}
    return out


def _meets(s: dict[str, float]) -> bool:
    return s["density_reduction_pct"] >= 40 and s["metric_delta"] >= -1


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
        f"seed {sd}: −{v['density_reduction_pct']:.1f}% / {v['metric_delta']:+.2f}" for sd, v in summary["seeds"].items()
    )
    return lines + [
        "",
        f"All {o['pairs']} pairs: density −{o['density_reduction_pct']:.1f}%, metric {o['metric_delta']:+.2f} "
        f"points ({'meets' if _meets(o) else 'misses'} ≥ 40% and ≤ 1 point). Per seed: {per_seed} "
        f"(sd of the seed means {o['metric_delta_seed_sd']:.2f} points).",
    ]


def write_compare_report(rows: list[dict[str, Any]], config: CompareConfig) -> None:
    """``docs/results.md``: the seed-averaged table, per-α averages, and a metric-vs-density plot."""
    from deftune.hardware import describe_line

    recorded = read_json(config.results_json).get("hardware") if Path(config.results_json).is_file() else None

    md = Path(config.report_md)
    img = md.parent / "img" / f"{md.stem}_metric_vs_density.png"  # one figure per report
    plot_metric_vs_density(rows, img)
    seeds_seen = sorted({int(r.get("seed", 0)) for r in rows})
    has_squad = any(r["task"] == SQUAD for r in rows)
    has_glue = any(r["task"] != SQUAD for r in rows) or not rows
    title = {(True, False): "GLUE: PEFT vs DEFT, every method", (False, True): "SQuAD (generative QA): PEFT vs DEFT"}
    model = "MiniLM (all-MiniLM-L6-v2)" if config.model == "minilm" else f"`{config.model}`"
    glue_lines = [
        f"{model}, {config.steps} steps × batch {config.batch_size}, train subset "
        f"{config.train_subset}, max length {config.max_length}, α schedule `{config.schedule}` "
        f"(warm-up {config.warmup_steps}); "
        + (f"metric on {config.holdout} training examples held out of training (not the dev set)" if config.holdout
           else "dev metric on the full dev set") + "; exact density in fp32 over real tokens.",
        f"DEFT recipe for every method: learned activation scales `act_scale={config.act_scale}` "
        f"(lr {config.scale_lr:g}, in PEFT and DEFT runs alike), head lr {config.head_lr}, method lr "
        "from `METHOD_LR`; regression heads start at the mean training label.",
    ]
    squad_lines = [
        f"SQuAD rows: `{config.generative_model}`, {config.steps} steps, held-out articles of the SQuAD v1.1 dev file, "
        "greedy decoding, metric F1 (EM in the JSON), exact density of the teacher-forced pass; GenConfig options "
        f"{config.generative_options or 'default'}.",
    ]
    lines = [
        f"# {title.get((has_glue, has_squad), 'PEFT vs DEFT, every method')}",
        "",
        *(glue_lines if has_glue else []),
        *(squad_lines if has_squad else []),
        f"Hardware: {describe_line(recorded if isinstance(recorded, dict) else None)}.",
        f"Seeds in the results file: {', '.join(map(str, seeds_seen))}; every number below is a mean over "
        "the seeds that row has (column `seeds`; each run is a row of the JSON file).",
        "",
        "Reproduce: `deftune compare --tasks " + ",".join(config.tasks) + " --methods " + ",".join(config.methods)
        + " --alphas " + ",".join(f"{a:g}" for a in config.alphas)
        + " --seeds " + ",".join(map(str, config.seeds)) + (" --data-dir ../shared/data/glue" if has_glue else "")
        + "".join(f" --{name.replace('_', '-')} {getattr(config, name)}"
                  for name in ("results_json", "report_md", "runs_dir", "generative_model", "squad_dir", "holdout",
                               "select_alpha_from", "select_tolerance")
                  if getattr(config, name) != getattr(CompareConfig, name))
        + (" --generative-options " + ",".join(f"{k}={v}" for k, v in config.generative_options.items())
           if config.generative_options else "") + "`",
        "",
        "| task | method | α | seeds | metric | mean | sd | exact density | trainable params | train s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["method"], float(r["alpha"])), []).append(r)
    for (task, method, alpha), rs in sorted(groups.items()):
        values = [r["metric"]["value"] for r in rs]
        lines.append(
            f"| {task} | {method} | {alpha:g} | {len(rs)} | {rs[0]['metric']['name']} | {fmean(values):.2f} | "
            f"{_sd(values):.2f} | {fmean([r['density'] for r in rs]):.4f} | {rs[0]['trainable_parameters']:,} | "
            f"{fmean([r['train_seconds'] for r in rs]):.0f} |"
        )
    for alpha, summary in summarise(rows).items():
        lines += summary_lines(f"α = {alpha:g}: DEFT vs PEFT, averaged over tasks and seeds", summary)
    if config.select_alpha_from:
        from deftune.select_alpha import selection_lines

        lines += selection_lines(rows, load_rows(config.select_alpha_from), config.select_alpha_from,
                                 config.select_tolerance)
    lines += ["", f"![metric vs density]({img.relative_to(md.parent).as_posix()})", ""]
    if md.is_file():  # hand-written notes below the marker survive a rewrite
        old = md.read_text(encoding="utf-8")
        if NOTES_MARKER in old:
            lines += [NOTES_MARKER + old.split(NOTES_MARKER, 1)[1]]
    md.parent.mkdir(parents=True, exist_ok=True)
    tmp = md.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    os.replace(tmp, md)


def plot_metric_vs_density(rows: list[dict[str, Any]], path: Path) -> None:
    """One panel per task; one point per (method, α), the mean over seeds: colour = method, marker = α."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    tasks = sorted({r["task"] for r in rows})
    methods = sorted({r["method"] for r in rows})
    alphas = sorted({float(r["alpha"]) for r in rows})
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    markers = {a: "osD^vP*X"[i % 8] for i, a in enumerate(alphas)}
    fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(4 * max(1, len(tasks)), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for method in methods:
            for alpha in alphas:
                rs = [r for r in rows if r["task"] == task and r["method"] == method and float(r["alpha"]) == alpha]
                if rs:
                    ax.scatter(fmean([r["density"] for r in rs]), fmean([r["metric"]["value"] for r in rs]),
                               color=colours[method], marker=markers[alpha], s=28)
        ax.set_title(task)
        ax.set_xlabel("exact density")
        ax.set_ylabel("dev metric (mean over seeds)")
    handles = [Line2D([], [], color=c, marker="o", ls="", label=m) for m, c in colours.items()]
    handles += [Line2D([], [], color="k", marker=mk, ls="", label=f"α={a:g}") for a, mk in markers.items()]
    axes[0][-1].legend(handles=handles, fontsize=6, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


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
        runs_dir: where run directories go.
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
    runs_dir: str = "runs/sweep_alpha"
    results_json: str = "docs/results/sweep_alpha.json"
    plot: str = "docs/img/sweep_alpha.png"
    seed: int = 0
    model: str = "minilm"
    act_scale: str = "layer"
    scale_lr: float = 0.1
    head_lr: float | None = 5e-3


def run_alpha_sweep(config: AlphaSweepConfig, *, progress: bool = True) -> list[dict[str, Any]]:
    grid = CompareConfig(
        tasks=(config.task,), methods=(config.method,), alphas=config.alphas, steps=config.steps,
        train_subset=config.train_subset, schedule=config.schedule, warmup_steps=config.warmup_steps,
        data_dir=config.data_dir, runs_dir=config.runs_dir, results_json=config.results_json, seeds=(config.seed,),
        model=config.model, act_scale=config.act_scale, scale_lr=config.scale_lr, head_lr=config.head_lr,
    )
    rows = run_grid(grid.runs(), config.results_json, progress=progress)
    rows = [r for r in rows if r["task"] == config.task and r["method"] == config.method]
    plot_alpha_sweep(rows, Path(config.plot))
    return rows


def plot_alpha_sweep(rows: list[dict[str, Any]], path: Path) -> None:
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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


__all__ = ["AlphaSweepConfig", "CompareConfig", "METHOD_LR", "run_alpha_sweep", "run_compare"]
