"""The grid of ``deftune compare``: its config, run keys, results rows and the resumable runner.

* every finished run is a row in the results JSON (``docs/results/glue.json`` by default),
  keyed by (task, method, alpha, steps, seed, eval split, threshold density); a key already
  present is skipped;
* the JSON is rewritten atomically after each run, so an interruption loses at most the run in
  progress, whose half-written run directory is removed and restarted on the next invocation;
* several workers may run the same command at once (one per core): runs are claimed and rows
  appended under file locks (:func:`run_grid`).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deftune.act_scale import ACT_SCALES, SCALE_GRADS
from deftune.generative.config import GenConfig
from deftune.losses import DensityLossConfig
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
        density_target: None (the paper's density loss), or a density in (0, 1] at which the DEFT
            runs' density loss stops, layer by layer (``TrainConfig.density_target``: the hinge
            ``max(0, ρ̃_l − target)``); recorded in their rows.
        data_dir: GLUE folder.
        runs_dir: where run directories (and the workers' claim locks) go; None:
            ``runs/compare/<results file stem>-<hash of its path>``, so grids with results files of their own never
            share run folders or locks.
        results_json: the results file (one row per run; resumable).
        report_md: the markdown report written from the results file.
        seeds: random seeds; every (task, method, α) runs once per seed and the report averages
            over seeds (the small GLUE dev sets make one seed's average swing by about a point).
        model: the model every run fine-tunes.
        act_scale: learned activation scales for every method (``none``, ``layer``, ``neuron``;
            see :mod:`deftune.act_scale`): PEFT and DEFT runs both carry them, unless
            ``peft_act_scale`` says otherwise.
        peft_act_scale: the activation scales of the dense PEFT (α = 0) runs only; None: as
            ``act_scale``. ``none`` compares DEFT with plain PEFT, the baseline a ``peft`` user
            has: on the MiniLM GLUE grid the PEFT runs with learned scales score 1.22 points below
            plain PEFT (docs/results_plain_peft.md), so the default comparison flatters DEFT.
        scale_lr: learning rate of the learned activation scales (an Adam rate; an SGD rate
            under ``scale_grad="density"``); recorded in the rows of runs that carry scales.
        threshold_ramp: 0 (the threshold runs use their thresholds in full from the first step),
            or N in 2..``steps``: they ramp them in linearly, step ``s`` at ``min(1, (s + 1) / N)``
            of the calibrated value, and evaluate with them in full (``TrainConfig.act_threshold_ramp``).
            Needs ``threshold_densities``.
        scale_grad: which losses move the scales of the runs that carry them: ``all`` (task and
            density loss) or ``density`` (the density loss only, stepped by SGD at ``scale_lr``;
            ``MethodConfig.act_scale_grad``). ``scale_lr``'s default 0.1 is an Adam rate: as an SGD
            rate it barely moves the scales (SGD rates of 2–4 worked on the MiniLM GLUE grid).
        head_lr: learning rate of the task head (None: the method's learning rate). A head that
            starts at zero needs more than 1e-3 to reach STS-B's 0–5 label range in 250 steps.
        method_options: per-method overrides of :class:`deftune.methods.MethodConfig`
            (``{"prompt": {"prompt_init": "vocab"}}``; CLI ``prompt.prompt_init=vocab``).
        method_lr: per-method overrides of the learning rates in ``METHOD_LR``
            (``{"prompt": 0.1}``). A run's learning rate and method options are recorded in its
            row; a results file refuses runs of another recipe under the same key.
        generative_model: the model of the ``squad`` runs (``smollm2``; ``tiny-llama`` etc. for tests).
        squad_dir: SQuAD folder or JSON file of the ``squad`` runs (else ``$DEFTUNE_SQUAD_DIR``).
        holdout: None (score on the dev sets), or score every GLUE run on this many training
            examples held out of its training data (a fixed draw, :func:`deftune.data.glue.split_holdout`)
            — the grid for choosing α without the dev sets; use a results file of its own.
        select_alpha_from: a results file of a ``holdout`` grid, or a dev grid of other seeds than
            this one's; the report then adds the dev results at the α chosen per task on it
            (:func:`deftune.compare.select_alpha.select_alphas`).
        select_tolerance: the most metric points (on the selection file) the chosen α may lose
            against PEFT.
        threshold_densities: the threshold route: for each density d, every GLUE (task, method,
            seed) also runs at α = 0 through activation thresholds calibrated to d before training
            (``TrainConfig.act_threshold_density``); the report compares those runs with the dense
            PEFT runs as it compares each α. Empty: no threshold runs.
        generative_options: further :class:`deftune.generative.GenConfig` fields of the ``squad``
            runs (``batch_size=8,eval_questions=1000,act_threshold_density=0.58`` …); ``steps``
            and the seed come from this grid, the rest from ``GenConfig``'s defaults. A results
            file is keyed by (task, method, α, steps, seed) only: runs with other options (here or
            in the GLUE fields) need a results file of their own.
        deterministic: train every run with torch's deterministic algorithms
            (``TrainConfig.deterministic``, ``GenConfig.deterministic``), so that a GPU run repeats
            bit for bit; not part of the recipe (it changes only the run-to-run rounding, not what
            is computed).
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
    density_target: float | None = None
    data_dir: str | None = None
    runs_dir: str | None = None
    results_json: str = "docs/results/glue.json"
    report_md: str = "docs/results.md"
    seeds: tuple[int, ...] = (0,)
    model: str = "minilm"
    act_scale: str = field(default="layer", metadata={"choices": ACT_SCALES})
    peft_act_scale: str | None = field(default=None, metadata={"choices": ACT_SCALES})
    scale_lr: float = 0.1
    scale_grad: str = field(default="all", metadata={"choices": SCALE_GRADS})
    head_lr: float | None = 5e-3
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    method_lr: dict[str, float] = field(default_factory=dict)
    generative_model: str = "smollm2"
    squad_dir: str | None = None
    generative_options: dict[str, Any] = field(default_factory=dict)
    holdout: int | None = None
    select_alpha_from: str | None = None
    select_tolerance: float = 1.0
    threshold_densities: tuple[float, ...] = ()
    threshold_ramp: int = 0
    deterministic: bool = False

    def __post_init__(self) -> None:
        from deftune.data.glue import get_task
        from deftune.generative.peft_methods import PEFT_METHODS
        from deftune.methods import METHODS, MethodConfig
        from deftune.sparse.calibrate import check_threshold_ramp

        if not self.tasks:
            raise ValueError("tasks must name at least one task")
        if not self.alphas:
            raise ValueError("alphas must hold at least one α (0 runs PEFT)")
        if not (isinstance(self.steps, int) and not isinstance(self.steps, bool) and self.steps >= 1):
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}")
        for t in self.tasks:
            if t != SQUAD:
                get_task(t)
        for name in ("act_scale", "peft_act_scale"):
            value = getattr(self, name)
            if value not in ACT_SCALES and not (name == "peft_act_scale" and value is None):
                raise ValueError(f"{name} must be one of {list(ACT_SCALES)}, got {value!r}")
        if self.scale_grad not in SCALE_GRADS:
            raise ValueError(f"scale_grad must be one of {list(SCALE_GRADS)}, got {self.scale_grad!r}")
        if self.scale_grad != "all" and self.act_scale == "none":
            raise ValueError(f"scale_grad={self.scale_grad!r} needs learned scales (act_scale 'layer' or 'neuron'); "
                             "this grid has act_scale='none'")
        if self.peft_act_scale is not None and (0.0 not in self.alphas or SQUAD in self.tasks):
            raise ValueError(f"peft_act_scale sets the scales of the dense GLUE PEFT runs (α = 0); this grid has "
                             f"none (alphas {list(self.alphas)}, tasks {list(self.tasks)}): add 0 to --alphas, or "
                             "drop --peft-act-scale")
        if not self.methods:
            raise ValueError("methods must name at least one PEFT method")
        if any(t != SQUAD for t in self.tasks) and (unknown := [m for m in self.methods if m not in METHODS]):
            raise ValueError(f"unknown method(s) {unknown} for GLUE runs; choose from {sorted(METHODS)}")
        for method, lr in self.method_lr.items():
            if method not in METHODS:
                raise ValueError(f"method_lr names unknown method {method!r}; choose from {sorted(METHODS)}")
            if not (isinstance(lr, (int, float)) and not isinstance(lr, bool) and 0 < lr < float("inf")):
                raise ValueError(f"method_lr[{method!r}] must be a learning rate > 0, got {lr!r}")
        for method, options in self.method_options.items():
            if method not in METHODS:
                raise ValueError(f"method_options names unknown method {method!r}; choose from {sorted(METHODS)}")
            if "name" in options:
                raise ValueError(f"method_options[{method!r}] may not set 'name': each method's options go under "
                                 "its own name (--methods chooses the methods)")
            MethodConfig.from_dict({"name": method, **options})  # unknown or inapplicable options fail here
        unused = sorted((set(self.method_lr) | set(self.method_options)) - set(self.methods))
        if unused:
            raise ValueError(f"method_lr / method_options name methods {unused} that this grid does not run "
                             f"(methods: {list(self.methods)})")
        if SQUAD in self.tasks and (self.method_lr or self.method_options):
            raise ValueError("method_lr and method_options apply to GLUE runs; squad runs take "
                             "--generative-options (run squad in a grid of its own)")
        if SQUAD in self.tasks:
            generative = sorted(PEFT_METHODS) + ["full"]
            unsupported = [m for m in self.methods if m not in generative]
            if unsupported:
                raise ValueError(
                    f"methods {unsupported} have no generative (squad) version; squad runs accept {generative}: "
                    "run squad in a grid of its own with those methods"
                )
            if set(self.tasks) == {SQUAD}:  # no GLUE run would use them: refuse rather than drop them
                glue_only = ("train_subset", "eval_subset", "batch_size", "max_length", "schedule", "warmup_steps",
                             "head_lr", "act_scale", "peft_act_scale", "scale_lr", "scale_grad", "density_target")
                changed = [f"--{n.replace('_', '-')}" for n in glue_only
                           if getattr(self, n) != getattr(CompareConfig, n)]
                if changed:
                    raise ValueError(f"{', '.join(changed)} apply to GLUE runs and this grid runs squad only: set "
                                     "them through --generative-options (e.g. batch_size=8,alpha_schedule=sine)")
            fixed = sorted(set(self.generative_options) & {"model", "method", "alpha", "seed", "steps", "output_dir"})
            if fixed:
                raise ValueError(f"generative_options cannot set {fixed}: the grid sets them (use --steps, --seeds, ...)")
            self._squad_config("lora", 0.0, 0, "check")  # unknown or bad GenConfig options fail here
        if self.holdout is not None:
            if not (isinstance(self.holdout, int) and self.holdout > 0):
                raise ValueError(f"holdout must be a positive integer or None, got {self.holdout!r}")
            if SQUAD in self.tasks:
                raise ValueError("holdout applies to GLUE tasks (squad already scores held-out articles)")
        if self.select_alpha_from is not None and not Path(self.select_alpha_from).is_file():
            raise FileNotFoundError(f"select_alpha_from {self.select_alpha_from!r} does not exist: it must be the "
                                    "results file of an earlier grid (check --select-alpha-from)")
        if not (isinstance(self.select_tolerance, (int, float)) and self.select_tolerance >= 0):
            raise ValueError(f"select_tolerance must be a number >= 0, got {self.select_tolerance!r}")
        if any(a < 0 for a in self.alphas):
            raise ValueError(f"alphas must be >= 0, got {self.alphas}")
        if self.density_target is not None:
            if SQUAD in self.tasks:
                raise ValueError("density_target applies to GLUE runs; run squad in a grid of its own")
            if not any(a > 0 for a in self.alphas):
                raise ValueError(f"density_target stops the density loss of the DEFT runs (α > 0); this grid has none "
                                 f"(alphas {list(self.alphas)}): add an α > 0, or drop --density-target")
            DensityLossConfig(target=self.density_target)  # a density in (0, 1]
        if any(not 0 < d <= 1 for d in self.threshold_densities):
            raise ValueError(f"threshold_densities must be densities in (0, 1], got {self.threshold_densities}")
        check_threshold_ramp(self.threshold_ramp, self.steps, "threshold_ramp")
        if self.threshold_ramp and not self.threshold_densities:
            raise ValueError("threshold_ramp ramps in the thresholds of the threshold runs; this grid has none: "
                             "add --threshold-densities, or drop --threshold-ramp")
        if self.threshold_densities and SQUAD in self.tasks:
            raise ValueError("threshold_densities applies to GLUE tasks; squad runs take "
                             "--generative-options act_threshold_density=...")
        if not self.seeds or any(int(s) != s or s < 0 for s in self.seeds):
            raise ValueError(f"seeds must be one or more integers >= 0, got {self.seeds}")

    def _squad_config(self, method: str, alpha: float, seed: int, name: str) -> GenConfig:
        return GenConfig.from_dict({
            **self.generative_options, "model": self.generative_model, "method": method, "alpha": alpha,
            "seed": seed, "steps": self.steps, "data_dir": self.generative_options.get("data_dir", self.squad_dir),
            "output_dir": str(self.run_root / name),
            "deterministic": self.deterministic or self.generative_options.get("deterministic", False),
        })

    def _glue_config(self, task: str, method: str, alpha: float, seed: int, density: float | None) -> TrainConfig:
        config = TrainConfig(
            task=task, model=self.model, method=method, alpha=alpha, steps=self.steps,
            method_options={**self.scale_options(alpha, density), **self.method_options.get(method, {})},
            lr=self.method_lr.get(method, METHOD_LR.get(method, 1e-3)), scale_lr=self.scale_lr, head_lr=self.head_lr,
            batch_size=self.batch_size, max_length=self.max_length,
            train_subset=self.train_subset, eval_subset=self.eval_subset, holdout=self.holdout,
            schedule=self.schedule, warmup_steps=self.warmup_steps, data_dir=self.data_dir,
            act_threshold_density=density, act_threshold_ramp=self.threshold_ramp if density is not None else 0,
            density_target=self.density_target if alpha > 0 else None, seed=seed, deterministic=self.deterministic,
        )
        # the run's own name (task-method-α[-t<density>]), made unique within the grid
        name = config.run_name + (f"-s{seed}" if seed else "") + (f"-h{self.holdout}" if self.holdout else "")
        config.name, config.output_dir = name, str(self.run_root / name)
        return config

    @property
    def run_root(self) -> Path:
        """The folder of this grid's run directories: ``runs_dir``, else one per results file
        (its stem and a hash of its absolute path: ``a/results.json`` and ``b/results.json`` differ)."""
        if self.runs_dir:
            return Path(self.runs_dir)
        import hashlib

        where = hashlib.sha1(str(Path(self.results_json).resolve()).encode()).hexdigest()[:8]
        return Path("runs/compare") / f"{Path(self.results_json).stem}-{where}"

    def scales_of(self, alpha: float, density: float | None) -> str:
        """The ``act_scale`` of a GLUE run: ``peft_act_scale`` for the dense PEFT runs (α = 0, no
        thresholds) where it is set, ``act_scale`` for every other run."""
        dense_peft = alpha == 0 and density is None
        return self.peft_act_scale if dense_peft and self.peft_act_scale is not None else self.act_scale

    def scale_options(self, alpha: float, density: float | None) -> dict[str, str]:
        """The scale options of a GLUE run's method: ``act_scale`` (:meth:`scales_of`) and, when the
        run has scales and ``scale_grad`` is not the default, ``act_scale_grad``."""
        scales = self.scales_of(alpha, density)
        return {"act_scale": scales, **({"act_scale_grad": self.scale_grad}
                                        if scales != "none" and self.scale_grad != "all" else {})}

    def runs(self) -> list[RunConfig]:
        out: list[RunConfig] = []
        for seed in self.seeds:
            for task in self.tasks:
                for method in self.methods:
                    for alpha in self.alphas:
                        if task == SQUAD:
                            name = f"{task}-{method}-a{alpha:g}" + (f"-s{seed}" if seed else "")
                            out.append(self._squad_config(method, alpha, seed, name))
                        else:
                            out.append(self._glue_config(task, method, alpha, seed, None))
                    if task != SQUAD:
                        out += [self._glue_config(task, method, 0.0, seed, d) for d in self.threshold_densities]
        return out


def format_method_options(options: dict[str, dict[str, Any]]) -> str:
    """``{"prompt": {"prompt_init": "vocab"}}`` -> ``prompt.prompt_init=vocab``, the CLI's
    ``--method-options`` syntax (scalar values; list options have no CLI form)."""
    return ",".join(f"{m}.{k}={v}" for m, o in options.items() for k, v in o.items())


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def run_key(row: dict[str, Any]) -> tuple:
    """The identity of a results row: task, method, α, steps, seed, evaluation split, threshold
    density (the recipe is checked separately, by :func:`check_recipes`)."""
    return (row["task"], row["method"], float(row["alpha"]), int(row["steps"]), int(row.get("seed", 0)),
            row.get("eval_split", "dev"), _optional_float(row.get("act_threshold_density")))


def config_key(config: RunConfig) -> tuple:
    """The results-file key of a run config (as :func:`run_key` of its row)."""
    if isinstance(config, GenConfig):
        return (SQUAD, config.method, float(config.alpha), int(config.steps), int(config.seed), "dev", None)
    return (config.task, config.method, float(config.alpha), int(config.steps), int(config.seed), config.eval_split,
            _optional_float(config.act_threshold_density))


@functools.cache
def _method_defaults(method: str) -> dict[str, Any]:
    """``MethodConfig(method)``'s fields, built once per method (read-only: shared between calls)."""
    from deftune.methods import MethodConfig

    return MethodConfig(name=method).to_dict()


def recipe(row: dict[str, Any]) -> dict[str, Any]:
    """The training recipe a GLUE row was run with beyond its key: learning rate, head learning
    rate, ``act_scale`` (and ``scale_lr`` when the run carries scales), the method options that
    differ from :class:`deftune.methods.MethodConfig`'s defaults (JSON values: tuples as lists),
    for a threshold run that ramped its thresholds in, the ramp, and for a DEFT run whose density
    loss stops at a target, the target. Rows written before a field
    was recorded ran at its default (``METHOD_LR``, ``CompareConfig``'s head and scale learning
    rates, the default options). The grid's :data:`SETTINGS` (model, subsets, batch size, length,
    α schedule) are recorded in rows too and checked apart (rows older than them are not)."""
    defaults = _method_defaults(row["method"])
    options = json.loads(json.dumps(row.get("method_options", {})))
    act_scale = row.get("act_scale", "none")
    head_lr = row.get("head_lr", CompareConfig.head_lr)
    return {"lr": float(row.get("lr", METHOD_LR.get(row["method"], 1e-3))),
            "head_lr": None if head_lr is None else float(head_lr),
            "act_scale": act_scale,
            **({"scale_lr": float(row.get("scale_lr", CompareConfig.scale_lr))} if act_scale != "none" else {}),
            "method_options": {k: v for k, v in options.items() if k != "act_scale" and defaults.get(k) != v},
            **({"act_threshold_ramp": int(ramp)} if (ramp := row.get("act_threshold_ramp")) else {}),
            **({"density_target": float(target)} if (target := row.get("density_target")) is not None else {})}


def _config_recipe(config: TrainConfig) -> dict[str, Any]:
    return recipe({"method": config.method, "lr": config.lr, "head_lr": config.head_lr,
                   "act_scale": config.method_options.get("act_scale", "none"),
                   "scale_lr": config.scale_lr if config.scale_lr is not None else config.lr,
                   "method_options": config.method_options, "act_threshold_ramp": config.act_threshold_ramp,
                   "density_target": config.density_target})


def _glue_row(config: TrainConfig, *, progress: bool) -> dict[str, Any]:
    from deftune.train import train_glue

    d = train_glue(config, progress=progress).to_dict()
    own = _config_recipe(config)
    return {
        "task": config.task, "method": config.method, "alpha": config.alpha, "steps": config.steps,
        "seed": config.seed, "act_scale": own["act_scale"], "lr": config.lr, "head_lr": own["head_lr"],
        **({"scale_lr": own["scale_lr"]} if "scale_lr" in own else {}),
        **({"method_options": own["method_options"]} if own["method_options"] else {}),
        **({"eval_split": "holdout", "holdout": config.holdout} if config.holdout else {}),
        **({"act_threshold_density": config.act_threshold_density} if config.act_threshold_density is not None else {}),
        **({"act_threshold_ramp": config.act_threshold_ramp} if config.act_threshold_ramp else {}),
        **({"density_target": config.density_target} if config.density_target is not None else {}),
        "metric": d["metric"], "metrics": d["metrics"],
        **{k: getattr(config, k) for k in SETTINGS},
        "density": d["density"]["exact"], "per_layer_density": d["density"]["per_layer"],
        **({"virtual_tokens": d["density"]["virtual_tokens"],  # prompt / P-tuning: density is real tokens only
            "density_with_virtual_tokens": d["density"]["exact_with_virtual"]} if "virtual_tokens" in d["density"] else {}),
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
    """The run rows of a results file (``[]`` when it does not exist yet)."""
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


# grid settings a GLUE row records (since the seventeenth session) and a re-run must match; rows
# written before do not hold them and are not checked on them
SETTINGS = ("model", "train_subset", "eval_subset", "batch_size", "max_length", "schedule", "warmup_steps")


def _check_recipe(config: RunConfig, row: dict[str, Any], results_json: str) -> None:
    if not isinstance(config, TrainConfig):
        return
    if recipe(row) != _config_recipe(config):
        raise ValueError(
            f"{results_json} already holds {config.run_name} (seed {config.seed}) trained with {recipe(row)}; "
            f"this grid asks for {_config_recipe(config)}. Give this recipe a results file of its own "
            "(--results-json, --report-md)"
        )
    other = {k: (row[k], getattr(config, k)) for k in SETTINGS if k in row and row[k] != getattr(config, k)}
    if other:
        raise ValueError(
            f"{results_json} already holds {config.run_name} (seed {config.seed}) trained with other settings: "
            + ", ".join(f"{k} {held!r} (this grid: {asked!r})" for k, (held, asked) in other.items())
            + ". Give these settings a results file of its own (--results-json, --report-md)"
        )


def budget(row: dict[str, Any]) -> tuple[int, str, int | None]:
    """``(steps, eval split, holdout size)`` of a GLUE row: what a results file holds one of."""
    return int(row["steps"]), row.get("eval_split", "dev"), row.get("holdout")


def _config_budget(config: TrainConfig) -> tuple[int, str, int | None]:
    """:func:`budget` of the row ``config`` would write."""
    return budget({"steps": config.steps, "eval_split": config.eval_split, "holdout": config.holdout})


def check_one_budget(rows: Sequence[dict[str, Any]], results_json: str) -> tuple[int, str, int | None] | None:
    """The one :func:`budget` of a results file's GLUE rows (None without GLUE rows); raise
    ValueError when they mix step budgets or evaluation splits: reports and DEFT-vs-PEFT pairs pool a
    file's runs by task, method, variant and seed."""
    budgets = sorted({budget(r) for r in rows if r["task"] != SQUAD}, key=str)
    if len(budgets) > 1:
        raise ValueError(f"{results_json} mixes GLUE runs of several (steps, eval split, holdout) budgets "
                         f"{budgets}: split it into one results file per budget")
    return budgets[0] if budgets else None


def check_recipes(configs: Sequence[RunConfig], results_json: str) -> None:
    """Raise ValueError when ``results_json`` holds a run under one of these configs' keys that was
    trained with another recipe (:func:`recipe`), or GLUE runs of another step budget or evaluation
    split than these configs (:func:`budget`); the message names both and the fix."""
    rows = load_rows(results_json)
    held = check_one_budget(rows, results_json)
    for config in configs:
        if isinstance(config, TrainConfig) and held is not None and (b := _config_budget(config)) != held:
            raise ValueError(f"{results_json} holds GLUE runs of (steps, eval split, holdout) {held}; "
                             f"this grid trains {b}. Give it a results file of its own (--results-json, --report-md)")
    done = {run_key(r): r for r in rows}
    for config in configs:
        if (row := done.get(config_key(config))) is not None:
            _check_recipe(config, row, results_json)


def check_density_convention(configs: Sequence[RunConfig], results_json: str) -> None:
    """Raise ``ValueError`` when this grid would train prompt / P-tuning runs beside rows of the same
    methods whose density counted the virtual tokens (written before the seventeenth session: no
    ``virtual_tokens`` field): their pairs would mix two conventions."""
    rows = load_rows(results_json)
    done = {run_key(r) for r in rows}
    todo = {c.method for c in configs if isinstance(c, TrainConfig) and config_key(c) not in done}
    old = sorted({r["method"] for r in rows if r.get("method") in todo & {"prompt", "ptuning"}
                  and r.get("task") != SQUAD and "virtual_tokens" not in r})
    if old:
        raise ValueError(f"{results_json} holds {'/'.join(old)} runs whose density counted the virtual tokens "
                         "(measured before they were left out); new runs would not: give this grid a results "
                         "file of its own (--results-json, --report-md)")


def check_writable(path: str | Path) -> None:
    """Raise ``ValueError`` unless a file can be written at ``path`` (its folder is created): checked
    before anything trains, not after the first run."""
    folder = Path(path).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot create the folder of {path}: {err.strerror or err}") from None
    if not os.access(folder, os.W_OK):
        raise ValueError(f"cannot write {path}: its folder {folder} is not writable")


def run_grid(configs: Sequence[RunConfig], results_json: str, *, progress: bool = True) -> list[dict[str, Any]]:
    """Train every config not yet in ``results_json``; append each finished run atomically.

    Several workers may run the same grid (same command, same results file) to use more cores:
    each run is claimed by a lock on ``<runs dir>/.locks/<run name>.lock`` while it trains (a run
    claimed by another worker is passed over), and rows are appended under a lock on
    ``.<results file name>.lock`` beside it. Locks die with their process, so a killed worker
    leaves nothing stale.

    Raises:
        ValueError: before anything trains, when the file holds a run under one of these keys that
            was trained with another learning rate or other method options (:func:`recipe`).
    """
    check_recipes(configs, results_json)
    check_density_convention(configs, results_json)
    check_writable(results_json)
    for i, config in enumerate(configs):
        name = config.run_name if isinstance(config, TrainConfig) else Path(config.output_dir or "squad").name
        out = Path(config.output_dir) if config.output_dir else None
        lock = out.parent / ".locks" / f"{out.name}.lock" if out is not None else None
        claim = file_lock(lock, blocking=False) if lock is not None else nullcontext(True)
        with claim as mine:
            if not mine:
                print(f"[{i + 1}/{len(configs)}] {name}: training in another worker, passed over")
                continue
            done = {run_key(r): r for r in load_rows(results_json)}  # re-read: others append
            if config_key(config) in done:
                _check_recipe(config, done[config_key(config)], results_json)
                print(f"[{i + 1}/{len(configs)}] {name}: done, skipped")
                continue
            if out is not None and out.exists() and not (out / RESULTS_FILE).exists():
                shutil.rmtree(out)  # an interrupted run: restart it cleanly
            print(f"[{i + 1}/{len(configs)}] {name}: training")
            _append_row(results_json, ROW_BUILDERS[type(config)](config, progress=progress))
    return load_rows(results_json)
