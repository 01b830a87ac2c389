"""``train_generative(cfg) -> GenRunResult``: DEFT (or PEFT, or ReLU-fication) on SQuAD-style QA.

The run:

1. loads SQuAD v1.1 and splits it by article (``cfg.eval_articles`` held out; only the dev file
   exists here, so both parts come from it);
2. loads the model (``smollm2`` by default), optionally ReLU-fies it (:mod:`.relufy`) or wraps
   its activations in thresholds calibrated to ``cfg.act_threshold_density`` (optionally ramped
   up over ``cfg.act_threshold_warmup_steps``, :func:`threshold_ramp`), applies the PEFT
   method (``peft.get_peft_model``);
3. optionally evaluates it first (EM / F1, density, perplexity);
4. trains with ``task loss + alpha(step) * density loss`` inside a
   :class:`deftune.regularizer.DensityRegularizer` — the same code path for ``alpha = 0``;
5. evaluates again and saves the run folder: ``adapter/`` (peft format), ``deftune.json``
   (the config), ``results.json``, ``log.json`` and ``predictions.json``.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deftune.data.glue import DataError
from deftune.data.squad import SquadExample, load_squad, split_by_article
from deftune.determinism import deterministic_algorithms
from deftune.generative.config import GenConfig
from deftune.generative.evaluate import EvalReport, evaluate_generative, is_seq2seq
from deftune.generative.format import DoesNotFit, Encoded, encode_example, resolve_style, training_batch
from deftune.generative.models import load_generative
from deftune.generative.peft_methods import apply_peft_method
from deftune.generative.relufy import relufy
from deftune.losses import ALPHA_SCHEDULES
from deftune.progress import track
from deftune.regularizer import DensityRegularizer
from deftune.runs import THRESHOLDS_FILE, write_json_atomic
from deftune.sparse import (
    CalibrationConfig,
    Thresholds,
    apply_thresholds,
    calibrate_thresholds,
    ramped_thresholds,
)


@dataclass
class GenRunResult:
    """What a run measured. ``before`` is None when ``cfg.eval_before`` is off."""

    name: str
    config: dict
    before: EvalReport | None
    after: EvalReport
    train_seconds: float
    seconds_per_step: float
    train_questions: int
    eval_questions: int
    trainable_parameters: int
    skipped_questions: int = 0
    relufied: list[str] = field(default_factory=list)
    log: list[dict] = field(default_factory=list, repr=False)
    thresholds: Thresholds | None = None

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "before": self.before.summary() if self.before else None,
            "after": self.after.summary(),
            "train_seconds": self.train_seconds,
            "seconds_per_step": self.seconds_per_step,
            "train_questions": self.train_questions,
            "eval_questions": self.eval_questions,
            "trainable_parameters": self.trainable_parameters,
            "skipped_questions": self.skipped_questions,
            "relufied_modules": len(self.relufied),
        }


@dataclass
class SquadData:
    """Encoded training and evaluation questions of one run."""

    train: list[Encoded]
    eval_examples: list[SquadExample]
    eval_items: list[Encoded]
    ppl_texts: list[str]
    skipped: int = 0  # questions that did not fit max_length


def prepare_squad(cfg: GenConfig, tokenizer, seq2seq: bool) -> SquadData:
    """Split SQuAD by article, sample and encode both parts, and pick perplexity paragraphs."""
    examples = load_squad("dev", cfg.data_dir)
    train, held = split_by_article(examples, cfg.eval_articles, cfg.seed)
    rng = random.Random(cfg.seed)
    if cfg.train_subset is not None and cfg.train_subset < len(train):
        train = rng.sample(train, cfg.train_subset)
    eval_examples = rng.sample(held, min(cfg.eval_questions, len(held)))
    style = resolve_style(cfg.prompt_style, tokenizer)

    def encode_all(part: list[SquadExample]) -> tuple[list[SquadExample], list[Encoded]]:
        kept, items = [], []
        for e in part:
            try:
                items.append(encode_example(e, tokenizer, style=style, seq2seq=seq2seq, max_length=cfg.max_length,
                                            max_context_tokens=cfg.max_context_tokens, seed=cfg.seed))
                kept.append(e)
            except DoesNotFit:
                continue  # counted in the result as skipped
        return kept, items

    _, train_items = encode_all(train)
    eval_kept, eval_items = encode_all(eval_examples)
    for part, items in (("training", train_items), ("held-out", eval_items)):
        if not items:
            raise DataError(f"no {part} question fits max_length={cfg.max_length} tokens (with "
                            f"max_context_tokens={cfg.max_context_tokens}): raise max_length (--max-length)")
    paragraphs = list(dict.fromkeys(e.context for e in held))
    ppl_texts = rng.sample(paragraphs, min(cfg.ppl_texts, len(paragraphs)))
    skipped = len(train) - len(train_items) + len(eval_examples) - len(eval_items)
    return SquadData(train_items, eval_kept, eval_items, ppl_texts, skipped)


def _lr_lambda(cfg: GenConfig):
    def fn(step: int) -> float:
        if step < cfg.lr_warmup_steps:
            return (step + 1) / cfg.lr_warmup_steps
        progress = (step - cfg.lr_warmup_steps) / max(1, cfg.steps - cfg.lr_warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return fn


def _device(cfg: GenConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but torch sees no CUDA GPU; use device='cpu' or 'auto' "
                         "(CLI: --device cpu)")
    return torch.device(cfg.device)


def _evaluate(model: nn.Module, tokenizer, data: SquadData, cfg: GenConfig) -> EvalReport:
    return evaluate_generative(
        model, tokenizer, data.eval_examples, data.eval_items, max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.eval_batch_size, ppl_texts=data.ppl_texts, ppl_max_length=cfg.max_length, site=cfg.site,
    )


def threshold_ramp(model: nn.Module, warmup_steps: int) -> AbstractContextManager[Callable[[int], float]]:
    """:func:`deftune.sparse.ramped_thresholds` with ProSparse's sine: every threshold of ``model`` is
    ``sin(π/2 · step / warmup_steps) · t_l`` (1 from ``warmup_steps`` on), restored on exit."""
    sine = ALPHA_SCHEDULES["sine"]
    return ramped_thresholds(model, lambda step: sine(1.0, step, warmup_steps), warmup_steps)


def train_loop(model: nn.Module, items: list[Encoded], cfg: GenConfig, pad_id: int) -> list[dict]:
    """Optimise ``model``'s trainable parameters on ``items``; returns the log lines."""
    device = next(model.parameters()).device
    seq2seq = is_seq2seq(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    rng = random.Random(cfg.seed)
    order: list[int] = []
    log: list[dict] = []
    model.train()
    t0 = time.perf_counter()
    with DensityRegularizer(model, cfg.density_config()) as reg, \
            threshold_ramp(model, cfg.act_threshold_warmup_steps) as set_threshold_step:
        acc = {"task": 0.0, "density": 0.0, "n": 0}
        for step in track(range(cfg.steps), description="training"):
            threshold_scale = set_threshold_step(step)
            for _ in range(cfg.grad_accum):
                if len(order) < cfg.batch_size:
                    order += rng.sample(range(len(items)), len(items))  # next epoch, reshuffled
                chunk, order = order[: cfg.batch_size], order[cfg.batch_size :]
                batch = training_batch([items[i] for i in chunk], pad_id, seq2seq)
                out = model(**{k: v.to(device) for k, v in batch.items()})
                loss, parts = reg.total_loss(out.loss, step)
                (loss / cfg.grad_accum).backward()
                acc["task"] += parts.task
                acc["density"] += parts.density
                acc["n"] += 1
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            lr = sched.get_last_lr()[0]  # the rate this step used
            sched.step()
            opt.zero_grad(set_to_none=True)
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                density = reg.recorder.result().overall
                reg.recorder.reset()
                line = {
                    "step": step + 1, "task_loss": acc["task"] / acc["n"],
                    "density_loss": acc["density"] / acc["n"], "alpha": cfg.density_config().alpha_at(step),
                    "train_density": density, "threshold_scale": threshold_scale, "lr": lr,
                    "seconds": time.perf_counter() - t0,
                }
                log.append(line)
                print(json.dumps(line), flush=True)
                acc = {"task": 0.0, "density": 0.0, "n": 0}
    model.eval()
    return log


def train_generative(cfg: GenConfig) -> GenRunResult:
    """Run one generative DEFT experiment (see the module docstring) and return what it measured
    (with ``cfg.deterministic``, under torch's deterministic algorithms)."""
    with deterministic_algorithms(cfg.deterministic):
        return _train_generative(cfg)


def _train_generative(cfg: GenConfig) -> GenRunResult:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = _device(cfg)
    if cfg.output_dir:  # a folder trained into again must not look finished (or reload old weights) meanwhile
        clear_run(Path(cfg.output_dir))
    model, tokenizer = load_generative(cfg.model, cfg.seed)
    seq2seq = is_seq2seq(model)
    data = prepare_squad(cfg, tokenizer, seq2seq)
    model.to(device)
    replaced = relufy(model, cfg.relufy, cfg.relu_threshold) if cfg.relufy else []
    thresholds = None
    if cfg.act_threshold_density is not None:  # calibrated on the base model (LoRA starts as a no-op)
        thresholds = calibrate_on_training_prompts(model, data.train, cfg, tokenizer.pad_token_id)
    torch.manual_seed(cfg.seed)
    model = apply_peft_method(cfg, model)
    if thresholds is not None:  # after the adapter: an input threshold must sit on the adapted module
        apply_thresholds(model, thresholds)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    before = _evaluate(model, tokenizer, data, cfg) if cfg.eval_before else None
    t0 = time.perf_counter()
    log = train_loop(model, data.train, cfg, tokenizer.pad_token_id)
    seconds = time.perf_counter() - t0
    after = _evaluate(model, tokenizer, data, cfg)
    name = Path(cfg.output_dir).name if cfg.output_dir else f"{cfg.model}-{cfg.method}-a{cfg.alpha:g}"
    result = GenRunResult(
        name=name, config=cfg.to_dict(), before=before, after=after, train_seconds=seconds,
        seconds_per_step=seconds / cfg.steps, train_questions=len(data.train),
        eval_questions=len(data.eval_examples), trainable_parameters=trainable, skipped_questions=data.skipped,
        relufied=replaced, log=log, thresholds=thresholds,
    )
    if cfg.output_dir:
        save_run(Path(cfg.output_dir), model, result)
    return result


def calibrate_on_training_prompts(model: nn.Module, items: list[Encoded], cfg: GenConfig, pad_id: int) -> Thresholds:
    """Per-layer thresholds reaching ``cfg.act_threshold_density`` (shared among layers as
    ``cfg.act_threshold_mode`` says) on ``cfg.act_threshold_batches`` training batches (prompt +
    answer, real tokens only).

    The batches are drawn in a seeded order of their own, so the training loop's data order is the
    same with and without thresholds. Decoder-only inputs drop their labels (no loss is needed);
    encoder–decoder inputs keep them, as the decoder's inputs are built from them.
    """
    order = random.Random(cfg.seed + 1).sample(range(len(items)), len(items))
    n = min(len(items), cfg.act_threshold_batches * cfg.batch_size)
    seq2seq = is_seq2seq(model)
    batches = []
    for j in range(0, n, cfg.batch_size):
        batch = training_batch([items[i] for i in order[j : j + cfg.batch_size]], pad_id, seq2seq)
        if not seq2seq:
            batch.pop("labels")
        batches.append(batch)
    config = CalibrationConfig(target=float(cfg.act_threshold_density), mode=cfg.act_threshold_mode, site=cfg.site)
    return calibrate_thresholds(model, batches, config)


# what a run folder holds; results.json is written last and marks the run finished (deftune.runs)
RUN_FILES = ("results.json", "deftune.json", "predictions.json", "log.json", THRESHOLDS_FILE)


def clear_run(out: Path) -> None:
    """Remove what an earlier run left in ``out`` (its files and ``adapter/``), so that a run
    interrupted there is not taken for finished and a ``full`` run never reloads an old adapter."""
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    if (out / "adapter").is_dir():
        shutil.rmtree(out / "adapter")


def save_run(out: Path, model: nn.Module, result: GenRunResult) -> None:
    """Adapter (peft format, or nothing for ``full``), config, thresholds, log, predictions and,
    last, results."""
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "peft_config"):
        model.save_pretrained(out / "adapter")
    write_json_atomic(out / "deftune.json", {"kind": "generative", "config": result.config,
                                             "relufied_modules": result.relufied})
    if result.thresholds is not None:
        result.thresholds.save(out / THRESHOLDS_FILE)
    write_json_atomic(out / "predictions.json", result.after.predictions)
    write_json_atomic(out / "log.json", result.log)
    full = result.summary()
    full["after_density_per_layer"] = result.after.density_teacher_forced["per_layer"]
    write_json_atomic(out / "results.json", full)


def load_generative_run(run_dir: str | os.PathLike, **overrides: Any) -> tuple[nn.Module, Any, GenConfig]:
    """``(model, tokenizer, cfg)`` of a saved run: base model, ReLU-fication replayed, adapter loaded.

    ``overrides`` replace fields of the saved config (validated as a whole) before the model is placed,
    so ``device="cuda"`` evaluates a CPU-trained run on the GPU. ``full`` runs save no weights (only
    the config), so they cannot be reloaded; that raises.
    """
    run = Path(run_dir)
    meta_path = run / "deftune.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{str(run)!r} is not a generative run folder (no deftune.json)")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("kind") != "generative":
        raise ValueError(f"{str(run)!r} holds a {meta.get('kind')!r} run, not a generative one")
    cfg = GenConfig.from_dict({**meta["config"], **overrides})
    device = _device(cfg)  # fails before any weights load when the device is missing
    if cfg.method == "full":
        raise ValueError(f"{str(run)!r} is a full fine-tuning run: it saves no weights, so it cannot be reloaded "
                         "(its results.json holds what it measured)")
    if not (run / "adapter").is_dir():
        raise FileNotFoundError(f"{str(run)!r} has no adapter/ folder (method {cfg.method!r} saves none)")
    from peft import PeftModel

    model, tokenizer = load_generative(cfg.model, cfg.seed)
    if cfg.relufy:
        relufy(model, cfg.relufy, cfg.relu_threshold)
    model = PeftModel.from_pretrained(model, str(run / "adapter"))
    if cfg.act_threshold_density is not None:
        apply_thresholds(model, Thresholds.load(run / THRESHOLDS_FILE))
    return model.to(device).eval(), tokenizer, cfg


def evaluate_generative_run(run_dir: str | os.PathLike, **overrides: Any) -> EvalReport:
    """Re-evaluate a saved run on its held-out questions (``overrides`` replace config fields;
    ``threads``, the run's or the override, sets torch's thread count).

    The held-out questions are a seeded draw that follows the training subset's draw, and the
    perplexity paragraphs follow both: the same ``seed``, ``train_subset`` and ``eval_questions``
    as the run give its questions and paragraphs; another ``eval_questions`` also changes the
    paragraphs, so its perplexity is not the run's."""
    model, tokenizer, cfg = load_generative_run(run_dir, **overrides)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data = prepare_squad(cfg, tokenizer, is_seq2seq(model))
    return _evaluate(model, tokenizer, data, cfg)
