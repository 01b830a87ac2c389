"""``deftune skip``: remove MLP blocks from a trained run and report the task metric before/after.

    result = skip_run(SkipRunConfig(run_dir="runs/ada", skip=SkipConfig(policy="gate", tau=0.5)))

Steps: load the run (:func:`deftune.train.load_run`) and its ADA-DEFT gates (:func:`load_gates`);
merge the adapter into the base weights; fold every gate into its block (the *unskipped* model:
exactly the gated model that was trained); evaluate; choose blocks with the policy; remove them;
evaluate again; save the skipped model (:func:`save_skipped`) and ``skip_result.json``.
"""

from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from deftune.ada.config import SkipConfig
from deftune.ada.extension import load_gates
from deftune.ada.skip import SkipPlan, density_scores, param_bytes, plan_skip, save_skipped, skip_mlps_

RESULT_FILE = "skip_result.json"


@dataclass
class SkipRunConfig:
    """Options of :func:`skip_run` (validated).

    Attributes:
        run_dir: a finished ``deftune train`` / ``train_glue`` run directory.
        skip: the skip policy.
        output_dir: where the skipped model and ``skip_result.json`` go (default ``RUN_DIR/skipped``).
        density_examples: training examples used to measure density (``density`` policies/scores).
        latency_repeats: interleaved timed forward passes per model on one dev batch (0: none).
        save: write the skipped model to ``output_dir``.
    """

    run_dir: str
    skip: SkipConfig = field(default_factory=SkipConfig)
    output_dir: str | None = None
    density_examples: int = 256
    latency_repeats: int = 0
    save: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.skip, SkipConfig):
            raise TypeError(f"skip must be a SkipConfig, got {type(self.skip).__name__}")
        for key in ("density_examples", "latency_repeats"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{key} must be an int >= 0, got {value!r}")
        if self.skip.needs_density and self.density_examples < 1:
            raise ValueError(f"skip policy {self.skip.policy!r} scores blocks by measured density: "
                             f"density_examples must be >= 1, got {self.density_examples}")

    @property
    def out(self) -> Path:
        return Path(self.output_dir) if self.output_dir else Path(self.run_dir) / "skipped"


@dataclass
class SkipRunResult:
    """Before/after of one :func:`skip_run` (metrics on the run's dev set, 0–100)."""

    run_dir: str
    output_dir: str | None
    metric: str
    before: float
    after: float
    skipped: list[str]
    blocks: list[str]
    param_bytes_before: int
    param_bytes_after: int
    plan: dict[str, Any]
    latency_ms: dict[str, float] = field(default_factory=dict)
    hardware: str = ""

    @property
    def delta(self) -> float:
        return self.after - self.before

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["delta"] = self.delta
        return out


def plain_model(model: nn.Module) -> nn.Module:
    """The ``transformers`` model with the run's adapter merged into its weights."""
    from peft import PeftModel

    name = getattr(model.__dict__.get("deftune_method"), "name", None)
    if isinstance(model, PeftModel):
        if not model.active_peft_config.is_prompt_learning:
            return model.merge_and_unload()
        name = name or str(model.active_peft_config.peft_type.value).lower()
    elif name in (None, "full", "bitfit"):
        return model
    raise NotImplementedError(
        f"method {name!r} cannot be merged into the weights (it adds modules or virtual tokens); skipping "
        "needs lora/dora/ia3, bitfit or full fine-tuning"
    )


def _train_batches(cfg, tokenizer, limit: int | None) -> list[dict]:
    """Up to ``limit`` of the run's training examples (less any it held out), for the density policy."""
    from deftune.data.glue import get_task, load_split, make_batches, subsample

    task = get_task(cfg.task)
    examples = subsample(load_split(task, "train", cfg.data_dir, holdout=cfg.holdout), limit, seed=cfg.seed)
    return make_batches(examples, tokenizer, batch_size=cfg.eval_batch_size, max_length=max(128, cfg.max_length),
                        regression=task.is_regression)


def _metric(model: nn.Module, batches: list[dict], task) -> float:
    """The task's headline metric (no density hooks: a model may have no MLP block left)."""
    from deftune.data.metrics import compute_metrics
    from deftune.train.evaluate import predict

    was_training = model.training
    model.eval()
    try:
        preds, refs = predict(model, batches, task)
    finally:
        model.train(was_training)
    return compute_metrics(task.metrics[:1], preds, refs)[task.metrics[0]]


def prepare_run(run_dir: str | os.PathLike):
    """``(plain model with gates folded in, tokenizer, train config, gates or None)`` of a run."""
    from deftune.train import load_run

    model, tokenizer, cfg = load_run(run_dir)
    gates = load_gates(run_dir)
    model = plain_model(model).eval()
    if gates is not None:
        skip_mlps_(model, SkipPlan(skip=[], scales={k: v for k, v in gates.items() if v != 1.0}))
    return model, tokenizer, cfg, gates


def skip_run(config: SkipRunConfig) -> SkipRunResult:
    """Skip MLP blocks of a trained run by ``config.skip``; evaluate before and after; save."""
    from deftune.data.glue import get_task
    from deftune.hardware import describe_line
    from deftune.runs import write_json_atomic
    from deftune.train import eval_batches

    model, tokenizer, cfg, gates = prepare_run(config.run_dir)
    task = get_task(cfg.task)
    density = None
    if config.skip.needs_density:
        train = _train_batches(cfg, tokenizer, config.density_examples)
        density = density_scores(
            model,
            [{k: v for k, v in b.items() if k != "labels"} for b in train],
            config.skip.density_threshold,
        )
    # gates are already folded into the model: plan with them for scoring, fold nothing again
    plan = plan_skip(model, config.skip, gates=gates, density=density)
    blocks = list(plan.blocks)
    batches = eval_batches(cfg, tokenizer)  # the examples the run's own metric was measured on
    before = _metric(model, batches, task)
    dense = copy.deepcopy(model) if config.latency_repeats else None
    report = skip_mlps_(model, SkipPlan(skip=plan.skip), fold_gates=False)
    after = _metric(model, batches, task)
    latency: dict[str, float] = {}
    if dense is not None:
        from deftune.ada.measure import compare_latency

        inputs = {k: v for k, v in batches[0].items() if k != "labels"}
        stats = compare_latency(
            {"dense": lambda: dense(**inputs), "skipped": lambda: model(**inputs)},
            repeats=config.latency_repeats,
        )
        latency = {name: s.median_ms for name, s in stats.items()}
    out_dir = None
    if config.save:
        out_dir = str(save_skipped(model, config.out, plan, tokenizer))
    result = SkipRunResult(
        run_dir=str(config.run_dir),
        output_dir=out_dir,
        metric=task.metrics[0],
        before=before,
        after=after,
        skipped=report.skipped,
        blocks=blocks,
        param_bytes_before=report.param_bytes_before,
        param_bytes_after=param_bytes(model),
        plan=plan.to_dict(),
        latency_ms=latency,
        hardware=describe_line(),
    )
    if config.save:
        write_json_atomic(config.out / RESULT_FILE, result.to_dict())
    return result
