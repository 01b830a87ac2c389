"""Evaluation of a GLUE model: task metrics, exact and thresholded density, and the metric when
activations with |a| <= τ are really set to zero."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from deftune.arch import find_activation_sites
from deftune.data.glue import EVAL_SUBSET_SEED, GlueTask, get_task, load_split, make_batches, subsample
from deftune.data.metrics import compute_metrics
from deftune.density import ActivationRecorder, DensityResult
from deftune.progress import track

if TYPE_CHECKING:
    from deftune.train.config import TrainConfig


@dataclass
class EvalResult:
    """Metrics and density; ``density_with_virtual`` counts the virtual tokens of prompt / P-tuning
    as well (the official DEFT code's convention), None for methods without them."""

    metrics: dict[str, float]
    density: DensityResult
    zeroed_metrics: dict[str, float] = field(default_factory=dict)  # str(τ) -> headline metric
    virtual_tokens: int = 0
    density_with_virtual: DensityResult | None = None


@contextmanager
def zero_small_activations(model: nn.Module, tau: float) -> Iterator[None]:
    """Within the block, every MLP activation with ``|a| <= tau`` is replaced by exactly 0.

    Implemented with forward hooks that return the masked output (removed on exit).
    """
    modules = dict(model.named_modules())
    handles = []
    try:
        for site in find_activation_sites(model):
            handles.append(
                modules[site.module_path].register_forward_hook(
                    lambda mod, args, out: out.masked_fill(out.abs() <= tau, 0.0)
                )
            )
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def predict(model: nn.Module, batches: Sequence[dict], task: GlueTask, progress: bool = False):
    """``(predictions, references)`` over ``batches``."""
    device = next(model.parameters()).device
    preds: list = []
    refs: list = []
    it = track(batches, description="evaluating") if progress else batches
    for batch in it:
        inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        logits = model(**inputs).logits
        if task.is_regression:
            preds += logits.squeeze(-1).float().cpu().tolist()
        else:
            preds += logits.argmax(-1).cpu().tolist()
        refs += batch["labels"].tolist()
    return preds, refs


def evaluate_batches(
    model: nn.Module,
    batches: Sequence[dict],
    task: GlueTask,
    *,
    thresholds: Sequence[float] = (1e-3, 1e-2),
    zeroed: bool = True,
    count_padding: bool = False,
    progress: bool = False,
) -> EvalResult:
    """Metrics and density of ``model`` on ``batches`` (eval mode; restores the mode after).

    Density counts real tokens: the virtual tokens of prompt / P-tuning are left out, and measured
    with them in the same pass as ``density_with_virtual``.
    """
    from deftune.methods import virtual_token_count

    was_training = model.training
    n_virtual = virtual_token_count(model)
    model.eval()
    try:
        recorders = [ActivationRecorder(model, thresholds=thresholds, count_padding=count_padding, skip_leading=skip)
                     for skip in ((n_virtual, 0) if n_virtual else (0,))]  # real tokens; with the virtual ones
        with ExitStack() as stack:
            for rec in recorders:
                stack.enter_context(rec)
            preds, refs = predict(model, batches, task, progress)
        for rec in recorders:
            rec.all_reduce()
        density, with_virtual = recorders[0].result(), recorders[-1].result() if n_virtual else None
        metrics = compute_metrics(task.metrics, preds, refs)
        zeroed_metrics: dict[str, float] = {}
        if zeroed:
            for tau in thresholds:
                with zero_small_activations(model, tau):
                    p, r = predict(model, batches, task)
                zeroed_metrics[f"{tau:g}"] = compute_metrics(task.metrics[:1], p, r)[task.metrics[0]]
        return EvalResult(metrics, density, zeroed_metrics, n_virtual, with_virtual)
    finally:
        model.train(was_training)


def eval_batches(config: TrainConfig, tokenizer, *, split: str | None = None) -> list[dict]:
    """The batches a run (:class:`deftune.train.TrainConfig`) is scored on: ``split`` of its task,
    by default the run's own ``eval_split`` (the dev set, or with ``holdout`` the training examples
    the run held out); the full split unless ``eval_subset``, a fixed draw. ``train_glue``,
    ``evaluate_glue`` and ``deftune skip`` all score these."""
    task = get_task(config.task)
    split = config.eval_split if split is None else split
    examples = subsample(load_split(task, split, config.data_dir, holdout=config.holdout),
                         config.eval_subset, seed=EVAL_SUBSET_SEED)
    return make_batches(
        examples, tokenizer, batch_size=config.eval_batch_size, max_length=max(128, config.max_length),
        regression=task.is_regression,
    )


def evaluate_glue(model: nn.Module, tokenizer, config: TrainConfig, *, split: str | None = None,
                  progress: bool = False) -> EvalResult:
    """Evaluate a run's model on its task's ``split`` (:func:`eval_batches`)."""
    batches = eval_batches(config, tokenizer, split=split)
    return evaluate_batches(model, batches, get_task(config.task), thresholds=config.thresholds, progress=progress)
