"""The training loop behind ``deftune train``: PEFT or DEFT on a GLUE task.

Data flow of one step::

    batch ─► model (PEFT-wrapped) ─► task loss ─┐
              │ forward hooks (ActivationRecorder)│
              └► per-layer surrogate φ(a) ───────►├─► total = task + α(step)·density (+ extensions)
                                                  ┘        │ backward → only method/head params

PEFT (α = 0) and DEFT take exactly this path. The threshold route (``act_threshold_density``)
calibrates per-layer activation thresholds on a few training batches before the first step and
wraps the activations in them (:mod:`deftune.sparse.thresholds`), so the method trains, and is
scored, through exact zeros. Under ``torchrun`` / ``accelerate launch`` the loop is
data-parallel (``accelerate`` wraps the model in DDP; each process takes every ``world``-th batch)
and the density counts are summed over processes before logging.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from deftune.act_scale import PARAM_NAME as SCALE_PARAM
from deftune.act_scale import density_only_scales, scale_medians
from deftune.data.glue import get_task, load_split, make_batches, subsample
from deftune.determinism import deterministic_algorithms
from deftune.progress import track
from deftune.regularizer import DensityRegularizer
from deftune.runs import (
    CONFIG_FILE,
    EXTENSION_FILE,
    RESULTS_FILE,
    THRESHOLDS_FILE,
    RunResult,
    write_json_atomic,
    write_safetensors_atomic,
)
from deftune.sparse import (
    CalibrationConfig,
    Thresholds,
    apply_thresholds,
    calibrate_thresholds,
    ramped_thresholds,
)
from deftune.train.config import TrainConfig
from deftune.train.evaluate import EvalResult, eval_batches, evaluate_batches
from deftune.train.model import build_model, count_trainable


@runtime_checkable
class TrainExtension(Protocol):
    """A subsystem that joins the training loop without editing it (e.g. ADA-DEFT gates)."""

    def prepare(self, model: nn.Module) -> None: ...

    def extra_loss(self, model: nn.Module, step: int) -> Tensor | None: ...

    def trainable_parameters(self) -> list[nn.Parameter]: ...

    def state_dict(self) -> dict: ...

    def log(self) -> dict[str, float]: ...

    # optional: ``bind_regularizer(regularizer)`` is called, when defined, once the density
    # regulariser exists (ADA-DEFT uses it to weight each layer's density loss by its gate);
    # ``before_save(model)`` before the run is saved, after its evaluation (compression extensions
    # put plain layers holding the compressed weights back, so the saved run is what was evaluated)


def _lr_lambda(config: TrainConfig):
    warm, total = config.lr_warmup_steps, config.steps

    def fn(step: int) -> float:
        ramp = min(1.0, (step + 1) / warm) if warm > 0 else 1.0
        if config.lr_schedule == "constant":
            return ramp
        return ramp * max(0.0, (total - step) / max(1, total - warm)) if step >= warm else ramp

    return fn


def _param_groups(model: nn.Module, config: TrainConfig, extra: Sequence[nn.Parameter]):
    def lr_or_default(value: float | None) -> float:
        return value if value is not None else config.lr

    own_optimizer = {id(p) for p in density_only_scales(model)}  # stepped by _scale_sgd
    head, bias, scale, rest = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in own_optimizer:
            continue
        if "classifier" in name or "score" in name:
            head.append(p)
        elif name.endswith(".bias"):
            bias.append(p)
        elif name.endswith("." + SCALE_PARAM):
            scale.append(p)
        else:
            rest.append(p)
    groups = [
        {"params": rest, "lr": config.lr},
        {"params": bias, "lr": lr_or_default(config.bias_lr)},
        {"params": head, "lr": lr_or_default(config.head_lr)},
        {"params": scale, "lr": lr_or_default(config.scale_lr)},
    ]
    if extra:
        groups.append({"params": list(extra), "lr": config.lr})
    return [g for g in groups if g["params"]]


def _scale_sgd(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer | None:
    """Plain SGD at ``scale_lr`` (constant) for the scales that only the density loss moves
    (:func:`deftune.act_scale.density_only_scales`): their step then follows ``α · ∂ρ̃/∂θ``, where
    AdamW's would not depend on α. None when the model has none."""
    params = density_only_scales(model)
    if not params:
        return None
    assert config.scale_lr is not None  # TrainConfig requires it with act_scale_grad='density'
    return torch.optim.SGD(params, lr=config.scale_lr)


def _step_batches(batches: list[dict], steps: int, rank: int, world: int, seed: int):
    """The batch of every step for this process, reshuffling the batch order each epoch."""
    import random

    rng = random.Random(seed)
    order: list[int] = []
    needed = steps * world
    while len(order) < needed:
        epoch = list(range(len(batches)))
        rng.shuffle(epoch)
        order.extend(epoch)
    return [batches[order[s * world + rank]] for s in range(steps)]


def train_glue(
    config: TrainConfig,
    extensions: Sequence[TrainExtension] = (),
    *,
    progress: bool = True,
) -> RunResult:
    """Fine-tune ``config.model`` on ``config.task`` with ``config.method`` (+ DEFT when α > 0).

    Evaluates on the dev set (task metric, exact density, thresholded density), saves the run
    directory when ``config.output_dir`` is set, and returns the :class:`RunResult`. With
    ``config.deterministic`` the whole run uses torch's deterministic algorithms.
    """
    with deterministic_algorithms(config.deterministic):
        return _train_glue(config, extensions, progress)


def _train_glue(config: TrainConfig, extensions: Sequence[TrainExtension], progress: bool) -> RunResult:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    if config.method_options.get("act_scale_grad") == "density" and accelerator.mixed_precision == "fp16":
        raise ValueError("act_scale_grad='density' (a second optimizer for the scales) does not support fp16 mixed "
                         "precision: each optimizer would step the shared grad scaler; launch with bf16 or fp32")
    rank, world = accelerator.process_index, accelerator.num_processes
    task = get_task(config.task)
    train = subsample(load_split(task, "train", config.data_dir, holdout=config.holdout), config.train_subset,
                      seed=config.seed)
    label_mean = sum(float(e.label) for e in train) / len(train) if task.is_regression else None
    model, tokenizer = build_model(config, label_mean)
    dev_batches = eval_batches(config, tokenizer)  # the dev set, or the held-out training examples
    for ext in extensions:
        ext.prepare(model)

    batches = make_batches(
        train, tokenizer, batch_size=config.batch_size, max_length=config.max_length,
        shuffle=True, seed=config.seed, regression=task.is_regression,
    )
    plan = _step_batches(batches, config.steps, rank, world, config.seed)
    thresholds = None
    if config.act_threshold_density is not None:  # the threshold route: calibrate, then train through them
        model.to(accelerator.device)
        thresholds = calibrate_on_training_batches(model, batches, config)
        apply_thresholds(model, thresholds)

    extra_params = [p for ext in extensions for p in ext.trainable_parameters()]
    optimizer = torch.optim.AdamW(_param_groups(model, config, extra_params), weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config))
    optimizers = [optimizer] + [o for o in (_scale_sgd(model, config),) if o is not None]  # fp16 refused above
    model, *optimizers = accelerator.prepare(model, *optimizers)

    from deftune.methods import virtual_token_count

    inner = accelerator.unwrap_model(model)
    regularizer = DensityRegularizer(
        inner, config.density_config(), thresholds=config.thresholds,
        skip_leading=virtual_token_count(inner), track_stats=False,
    )
    for ext in extensions:  # optional: extensions that weight the density loss (ADA-DEFT gates)
        bind = getattr(ext, "bind_regularizer", None)
        if callable(bind):
            bind(regularizer)
    log_path = Path(config.output_dir) / "train_log.jsonl" if config.output_dir and accelerator.is_main_process else None
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        # a folder trained into again is unfinished until save_run writes results.json last: a
        # stale results.json of an earlier run must not mark a run cut short in saving as done
        for stale in (RESULTS_FILE, CONFIG_FILE):
            (log_path.parent / stale).unlink(missing_ok=True)
        log_path.write_text("")

    ramp = config.act_threshold_ramp if thresholds is not None else 0  # linear: step s at min(1, (s+1)/ramp)
    model.train()
    start = time.perf_counter()
    with regularizer, ramped_thresholds(inner, lambda s: min(1.0, (s + 1) / ramp), ramp) as set_threshold_step:
        steps = track(range(config.steps), description=f"training {config.run_name}") if progress else range(config.steps)
        for step in steps:
            logging_step = step % config.log_every == 0 or step == config.steps - 1
            regularizer.recorder.track_stats = logging_step  # exact counts only when they are logged
            batch = {k: v.to(accelerator.device) for k, v in plan[step].items()}
            threshold_factor = set_threshold_step(step)  # 1 unless the thresholds are being ramped in
            outputs = model(**batch)
            loss, parts = regularizer.total_loss(outputs.loss, step)
            for ext in extensions:
                term = ext.extra_loss(inner, step)
                if term is not None:
                    loss = loss + term
            accelerator.backward(loss)
            for opt in optimizers:
                opt.step()
            scheduler.step()
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            if logging_step:
                regularizer.recorder.all_reduce()  # sum counts over processes (no-op alone)
                density = regularizer.recorder.result().overall
                elements = sum(c.elements for c in regularizer.recorder.counts.values())
                regularizer.recorder.reset()
                record = {
                    "step": step, "task_loss": parts.task, "density_loss": parts.density,
                    "alpha": parts.alpha, "exact_density": density, "density_elements": elements,
                    "world_size": world,
                }
                if ramp:
                    record["threshold_factor"] = threshold_factor
                medians = scale_medians(inner)  # learned activation scales, if any: median s per layer
                if medians:
                    record["act_scale"] = medians
                for ext in extensions:
                    record.update(ext.log())
                if log_path is not None:
                    with log_path.open("a") as f:
                        f.write(json.dumps(record) + "\n")
    train_seconds = time.perf_counter() - start

    model = accelerator.unwrap_model(model)
    evaluation = evaluate_batches(model, dev_batches, task, thresholds=config.thresholds, progress=progress)
    result = _make_result(config, evaluation, train_seconds, count_trainable(model))
    if config.output_dir and accelerator.is_main_process:
        save_run(config, model, result, extensions, thresholds)
    accelerator.wait_for_everyone()
    for ext in extensions:  # optional clean-up once evaluated and saved (hooks of gates, RigL, ...)
        close = getattr(ext, "close", None)
        if callable(close):
            close()
    return result


def calibrate_on_training_batches(model: nn.Module, batches: Sequence[dict], config: TrainConfig) -> Thresholds:
    """Per-layer thresholds reaching ``config.act_threshold_density`` on ``config.act_threshold_batches``
    training batches, drawn in a seeded order of their own (the training plan is unchanged).

    Calibrated on the model with its method added (LoRA, IA3, adapters and BitFit start as the
    pre-trained function; prompt tuning's virtual tokens are left out, as in the density).
    """
    import random

    from deftune.methods import virtual_token_count

    order = random.Random(config.seed + 1).sample(range(len(batches)), len(batches))
    device = next(model.parameters()).device
    chosen = [{k: v.to(device) for k, v in batches[i].items() if k != "labels"}
              for i in order[: config.act_threshold_batches]]
    cal = CalibrationConfig(target=float(config.act_threshold_density), mode=config.act_threshold_mode,
                            site=config.site, count_padding=config.count_padding)
    return calibrate_thresholds(model, chosen, cal, skip_leading=virtual_token_count(model))


def _make_result(config: TrainConfig, ev: EvalResult, seconds: float, n_trainable: int) -> RunResult:
    task = get_task(config.task)
    headline = task.metrics[0]
    return RunResult(
        name=config.run_name,
        task=config.task,
        method=config.method,
        alpha=config.alpha,
        metric={"name": headline, "value": ev.metrics[headline]},
        density={"exact": ev.density.overall, "per_layer": ev.density.exact_per_layer,
                 **({"virtual_tokens": ev.virtual_tokens, "exact_with_virtual": ev.density_with_virtual.overall}
                    if ev.density_with_virtual is not None else {})},
        train_seconds=seconds,
        metrics=ev.metrics,
        thresholded={
            f"{t:g}": {"density": ev.density.thresholded_overall(t), "metric": ev.zeroed_metrics.get(f"{t:g}")}
            for t in config.thresholds
        },
        trainable_parameters=n_trainable,
        steps=config.steps,
    )


def save_run(config: TrainConfig, model: nn.Module, result: RunResult, extensions: Sequence[TrainExtension] = (),
             thresholds: Thresholds | None = None) -> Path:
    """Write the run directory: adapter, ``deftune.json``, ``results.json``, extension state and
    the activation thresholds of a threshold-route run."""
    import deftune
    from deftune.methods import save_adapter

    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for ext in extensions:  # optional: an extension that wraps layers hands the model back plain
        before_save = getattr(ext, "before_save", None)
        if callable(before_save):
            before_save(model)
    save_adapter(model, out)
    write_json_atomic(out / CONFIG_FILE, {"deftune_version": deftune.__version__, "train": config.to_dict()})
    states = {}
    for i, ext in enumerate(extensions):
        for key, value in ext.state_dict().items():
            states[f"{i}.{key}"] = value.detach().cpu().contiguous()
    if states:
        write_safetensors_atomic(out / EXTENSION_FILE, states)
    if thresholds is not None:
        thresholds.save(out / THRESHOLDS_FILE)
    write_json_atomic(out / RESULTS_FILE, result.to_dict())  # last: its presence marks a finished run
    return out
