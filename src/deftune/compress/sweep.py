"""Compression sweeps on a fine-tuned GLUE run: the task metric against bits and against sparsity.

:func:`quant_sweep` evaluates, for every bit width x granularity x method (``rtn``, ``gptq``,
``mse``), the dev metric of the run's model with its block Linear layers quantized, and the bytes of
the really packed weights. :func:`sparsity_sweep` does the same for sparsity levels x patterns x
methods (``oneshot`` magnitude pruning, ``mse`` layer-wise refit, ``recovery`` fine-tuning with a
fixed mask, ``gmp`` gradual magnitude pruning, ``rigl``). Results are merged into one JSON file
(points keyed by pattern and method, written atomically) and plotted as PNG
(:mod:`deftune.compress.results`).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from deftune.compress.model import QuantConfig, SparsityConfig, check_compressible, compress_
from deftune.compress.packed import pack_
from deftune.compress.patterns import FRACTIONAL, PatternError, parse_quant, parse_sparsity
from deftune.compress.results import command_line, make_section, merge_results, plot_quant, plot_sparsity
from deftune.compress.training import (
    CompressionExtension,
    DynamicSchedule,
    DynamicSparsity,
    FinetuneConfig,
    GradualPruning,
    PruningSchedule,
    finetune,
)

QUANT_METHODS = ("rtn", "gptq", "mse", "qat")
SPARSITY_METHODS = ("oneshot", "mse", "recovery", "gmp", "rigl")
QUANT_KEY = ("pattern", "method")  # a point replaces an earlier one with the same fields
SPARSITY_KEY = ("pattern", "method", "allocation")


@dataclass
class SweepData:
    """What every sweep point shares: the fine-tuned model (never modified) and the batches."""

    model: nn.Module
    task: object
    dev: list
    calibration: list
    train: list
    run_dir: str


def load_sweep_data(
    run_dir: str,
    data_dir: str | None,
    calib_size: int,
    seed: int,
    eval_subset: int | None,
    train_examples: int = 0,
    train_batch_size: int = 32,
) -> SweepData:
    """The run's model and tokenized batches: dev (sorted by length: less padding, same metric),
    ``calib_size`` calibration sentences and ``train_examples`` training examples (0: none)."""
    from deftune.data.glue import get_task, load_glue, make_batches, subsample
    from deftune.train import load_run

    model, tokenizer, cfg = load_run(run_dir)
    data_dir = data_dir if data_dir is not None else cfg.data_dir
    task = get_task(cfg.task)
    dev = sorted(subsample(load_glue(task, "dev", data_dir), eval_subset, seed=seed), key=lambda e: len(e.text_a) + len(e.text_b or ""))
    train = load_glue(task, "train", data_dir)
    calib = subsample(train, calib_size, seed=seed + 1)
    common = dict(max_length=cfg.max_length, regression=task.is_regression)
    return SweepData(
        model=model.eval(),
        task=task,
        dev=make_batches(dev, tokenizer, batch_size=128, max_length=max(128, cfg.max_length), regression=task.is_regression),
        calibration=[
            {k: v for k, v in b.items() if k != "labels"}
            for b in make_batches(calib, tokenizer, batch_size=32, **common)
        ],
        train=make_batches(subsample(train, train_examples, seed=seed + 2), tokenizer, batch_size=train_batch_size,
                           shuffle=True, seed=seed, **common) if train_examples else [],
        run_dir=str(run_dir),
    )


def evaluate(model: nn.Module, data: SweepData) -> float:
    """The task's headline dev metric (0-100)."""
    from deftune.train import evaluate_batches

    result = evaluate_batches(model, data.dev, data.task, zeroed=False)
    return float(result.metrics[data.task.metrics[0]])


def _pack_check(model: nn.Module, data: SweepData, n_batches: int = 2) -> dict:
    """Pack the quantized layers for real; bytes and the largest logit difference to the fake model."""
    device = next(model.parameters()).device
    inputs = [{k: v.to(device) for k, v in b.items() if k != "labels"} for b in data.dev[:n_batches]]
    with torch.no_grad():
        fake = [model(**b).logits for b in inputs]
        report = pack_(model)
        real = [model(**b).logits for b in inputs]
    diff = max(float((f - r).abs().max()) for f, r in zip(fake, real))
    return {"fp32_bytes": report.fp32_bytes, "packed_bytes": report.packed_bytes, "ratio": report.ratio,
            "max_abs_logit_diff_vs_fake": diff, "checked_examples": sum(len(b["input_ids"]) for b in inputs)}


# ---- quantization sweep ------------------------------------------------------------------------------


@dataclass
class QuantSweepConfig:
    """Task metric against bits.

    Attributes:
        run_dir: a fine-tuned run directory (``deftune train --method full``).
        bits: bit widths. granularities: pattern tokens (``ch``, ``g128``, ``tensor``, ``ch1``...).
        asym: asymmetric (scale + zero-point) instead of symmetric quantization.
        clip: extra pattern token for clipping (``mse``, ``p99.9``) or empty.
        methods: ``rtn`` (round to nearest), ``gptq``, ``mse`` (STE refit per layer), ``qat``
            (quantization-aware recovery fine-tuning through the STE, then scales frozen).
        steps, lr, batch_size: the QAT fine-tuning.
        calib_size: calibration sentences from the training set. eval_subset: dev subset (None: all).
        data_dir: GLUE folder (None: the run's). output: results JSON. plot: PNG (None: no plot).
        pack: pack the weights for real and record bytes and output agreement.
        seed: calibration sample. threads: torch threads.
    """

    run_dir: str = "runs/compress_base"
    bits: tuple[int, ...] = (2, 3, 4, 6, 8)
    granularities: tuple[str, ...] = ("ch", "g128")
    asym: bool = False
    clip: str = ""
    methods: tuple[str, ...] = ("rtn", "gptq")
    steps: int = 100
    lr: float = 2e-5
    batch_size: int = 32
    calib_size: int = 256
    eval_subset: int | None = None
    data_dir: str | None = None
    output: str = "docs/results/compression.json"
    plot: str | None = "docs/img/compression_quant.png"
    pack: bool = True
    seed: int = 0
    threads: int = 1

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in QUANT_METHODS]
        if bad:
            raise ValueError(f"unknown quantization method(s) {bad}; choose from {list(QUANT_METHODS)}")
        for p in self.patterns():
            parse_quant(p)  # raises PatternError naming the accepted forms

    def patterns(self) -> list[str]:
        tail = (":asym" if self.asym else "") + (f":{self.clip}" if self.clip else "")
        return [f"int{b}:{g}{tail}" for g in self.granularities for b in self.bits]


def quant_sweep(config: QuantSweepConfig) -> dict:
    """Run the quantization sweep; returns (and merges into ``config.output``) its results."""
    torch.set_num_threads(config.threads)
    start = time.perf_counter()
    n_train = config.steps * config.batch_size if "qat" in config.methods else 0
    data = load_sweep_data(config.run_dir, config.data_dir, config.calib_size, config.seed, config.eval_subset,
                           n_train, config.batch_size)
    for text in config.patterns():  # every point's pattern fits the model before the first runs
        check_compressible(data.model, QuantConfig(text))
    baseline = evaluate(data.model, data)
    points = []
    for text in config.patterns():
        pattern = parse_quant(text)
        for method in config.methods:
            t0 = time.perf_counter()
            model = copy.deepcopy(data.model)
            if method == "qat":
                report = _qat(model, pattern, data, config)
            else:
                recon = {"rtn": "none"}.get(method, method)
                report = compress_(model, QuantConfig(pattern, reconstruct=recon), calibration=data.calibration)
            metric = evaluate(model, data)
            point = quant_point(pattern, method, metric, baseline, report)
            if config.pack:
                point["packed"] = _pack_check(model, data)
            point["seconds"] = time.perf_counter() - t0
            point["command"] = command_line()
            points.append(point)
            # merged at once, so an interrupted or failing sweep keeps what it ran; the invocation at the end
            merge_results(config.output, "quant", make_section(config, data, baseline, [point], start, finished=False),
                          key=QUANT_KEY)
            print(f"{text:18s} {method:5s} {data.task.metrics[0]} {metric:6.2f} ({metric - baseline:+.2f})", flush=True)
    section = make_section(config, data, baseline, points, start)
    merged = merge_results(config.output, "quant", section, key=QUANT_KEY)
    if config.plot:
        plot_quant(merged["quant"], config.plot)
    return merged["quant"]


def quant_point(pattern, method: str, metric: float, baseline: float, report) -> dict:
    """One sweep point's row: the metric against the baseline, and the compression report's means
    (output relative error; weight SQNR in dB averaged over the quantized layers)."""
    finite = [lr.weight_sqnr_db for lr in report.layers if math.isfinite(lr.weight_sqnr_db)]
    return {
        "pattern": str(pattern), "method": method, "bits": pattern.bits, "granularity": _gran(pattern),
        "metric": metric, "delta": metric - baseline, "mean_output_rel_error": report.mean_output_error,
        # layers reproduced exactly (infinite SQNR) are left out of the mean: JSON has no infinity
        "mean_weight_sqnr_db": sum(finite) / len(finite) if finite else None,
        "exact_layers": len(report.layers) - len(finite), "layers": len(report.layers),
    }


def _qat(model: nn.Module, pattern, data: SweepData, cfg: QuantSweepConfig):
    """Quantization-aware fine-tuning (scales follow the weights), then freeze the scales."""
    from deftune.compress.training import freeze_quantizers_

    model.requires_grad_(True)
    ext = CompressionExtension(QuantConfig(pattern, freeze=False))
    finetune(model, data.train, FinetuneConfig(steps=cfg.steps, lr=cfg.lr, warmup_steps=max(1, cfg.steps // 10),
                                               seed=cfg.seed), [ext])
    freeze_quantizers_(model)
    return ext.report


def _gran(p) -> str:
    return {"tensor": "tensor", "channel": f"ch{p.axis}", "group": f"g{p.group_size}"}[p.granularity]


# ---- sparsity sweep ----------------------------------------------------------------------------------


@dataclass
class SparsitySweepConfig:
    """Task metric against sparsity.

    Attributes:
        run_dir: a fine-tuned run directory.
        levels: sparsity levels for fraction-based patterns.
        patterns: pattern templates: ``unstructured``, ``block:4x4``, ``channel`` (a level is appended)
            or fixed patterns such as ``nm:2:4``.
        methods: ``oneshot`` (magnitude), ``mse`` (layer-wise refit), ``recovery`` (fine-tune with the
            mask fixed), ``gmp`` (gradual magnitude pruning over the same steps), ``rigl``.
        train_levels: levels at which the training methods (recovery, gmp, rigl) run.
        allocation: across layers (uniform, global, erk).
        steps: recovery fine-tuning steps. lr: its peak learning rate. batch_size: its batch size.
        calib_size, eval_subset, data_dir, output, plot, seed, threads: as in the quantization sweep.
    """

    run_dir: str = "runs/compress_base"
    levels: tuple[float, ...] = (0.3, 0.5, 0.7, 0.9)
    patterns: tuple[str, ...] = ("unstructured", "nm:2:4")
    methods: tuple[str, ...] = ("oneshot", "recovery")
    train_levels: tuple[float, ...] = (0.5,)
    allocation: str = "uniform"
    steps: int = 100
    lr: float = 5e-5
    batch_size: int = 32
    calib_size: int = 256
    eval_subset: int | None = None
    data_dir: str | None = None
    output: str = "docs/results/compression.json"
    plot: str | None = "docs/img/compression_sparsity.png"
    seed: int = 0
    threads: int = 1

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in SPARSITY_METHODS]
        if bad:
            raise ValueError(f"unknown sparsity method(s) {bad}; choose from {list(SPARSITY_METHODS)}")
        for t in self.patterns:
            expand_pattern(t, 0.5)
        for pattern, _ in self.points():  # every pattern with the allocation, before any point runs
            SparsityConfig(pattern, self.allocation)

    def points(self) -> list[tuple[object, str]]:
        """``(pattern, method)`` pairs to run."""
        out = []
        for template in self.patterns:
            fixed = _fixed(template)
            levels = [None] if fixed else list(self.levels)
            for level in levels:
                pattern = fixed or expand_pattern(template, level)
                for method in self.methods:
                    training = method in ("recovery", "gmp", "rigl")
                    if training and not fixed and not any(abs(level - t) < 1e-9 for t in self.train_levels):
                        continue
                    if method in ("gmp", "rigl") and not isinstance(pattern, FRACTIONAL):
                        continue  # schedules ramp a fraction; N:M is fixed
                    if method == "rigl" and type(pattern).__name__ != "Unstructured":
                        continue
                    out.append((pattern, method))
        return out


def _fixed(template: str):
    """The pattern if ``template`` is already complete (``nm:2:4``, ``unstructured:0.5``), else None."""
    try:
        return parse_sparsity(template)
    except PatternError:
        return None


def expand_pattern(template: str, level: float):
    """A template at one level: ``unstructured`` -> ``unstructured:0.5``, ``block:4x4`` ->
    ``block:4x4:0.5``, ``channel:cols`` -> ``channel:0.5:cols``; complete patterns are returned as is."""
    fixed = _fixed(template)
    if fixed is not None:
        return fixed
    head, *rest = template.split(":")
    if head == "channel":
        return parse_sparsity(":".join([head, f"{level:g}", *rest]))
    return parse_sparsity(f"{template}:{level:g}")


SparsityMethod = Callable[[nn.Module, object, SweepData, SparsitySweepConfig], dict]
SPARSITY_RUNNERS: dict[str, SparsityMethod] = {}


def _register(name: str):
    def deco(fn: SparsityMethod) -> SparsityMethod:
        SPARSITY_RUNNERS[name] = fn
        return fn

    return deco


def _recovery_config(model: nn.Module, cfg: SparsitySweepConfig) -> FinetuneConfig:
    model.requires_grad_(True)  # recovery is full fine-tuning of the compressed model
    return FinetuneConfig(steps=cfg.steps, lr=cfg.lr, warmup_steps=max(1, cfg.steps // 10), seed=cfg.seed)


@_register("oneshot")
def _oneshot(model, pattern, data, cfg) -> dict:
    rep = compress_(model, SparsityConfig(pattern, cfg.allocation), calibration=data.calibration)
    return {"mean_output_rel_error": rep.mean_output_error}


@_register("mse")
def _mse(model, pattern, data, cfg) -> dict:
    rep = compress_(model, SparsityConfig(pattern, cfg.allocation, reconstruct="mse"), calibration=data.calibration)
    return {"mean_output_rel_error": rep.mean_output_error}


@_register("recovery")
def _recovery(model, pattern, data, cfg) -> dict:
    ext = CompressionExtension(SparsityConfig(pattern, cfg.allocation))
    losses = finetune(model, data.train, _recovery_config(model, cfg), [ext])
    return {"train_steps": cfg.steps, "final_loss": sum(losses[-10:]) / len(losses[-10:])}


@_register("gmp")
def _gmp(model, pattern, data, cfg) -> dict:
    end = max(1, int(0.7 * cfg.steps))
    ext = GradualPruning(PruningSchedule(str(pattern), 0, end, max(1, end // 10), 0.0, cfg.allocation))
    losses = finetune(model, data.train, _recovery_config(model, cfg), [ext])
    return {"train_steps": cfg.steps, "final_loss": sum(losses[-10:]) / len(losses[-10:])}


@_register("rigl")
def _rigl(model, pattern, data, cfg) -> dict:
    sched = DynamicSchedule("rigl", pattern.sparsity, cfg.allocation, max(1, cfg.steps // 10), 0.3, int(0.75 * cfg.steps))
    ext = DynamicSparsity(sched, seed=cfg.seed)
    losses = finetune(model, data.train, _recovery_config(model, cfg), [ext])
    return {"train_steps": cfg.steps, "final_loss": sum(losses[-10:]) / len(losses[-10:]), "mask_updates": ext.updates}


def sparsity_sweep(config: SparsitySweepConfig) -> dict:
    """Run the sparsity sweep; returns (and merges into ``config.output``) its results."""
    from deftune.compress.model import compressed_layers
    from deftune.compress.sparsity import sparsity_of

    torch.set_num_threads(config.threads)
    start = time.perf_counter()
    training = any(m in ("recovery", "gmp", "rigl") for _, m in config.points())
    n_train = config.steps * config.batch_size if training else 0  # one pass, no example seen twice
    data = load_sweep_data(config.run_dir, config.data_dir, config.calib_size, config.seed, config.eval_subset,
                           n_train, config.batch_size)
    for pattern in dict.fromkeys(p for p, _ in config.points()):  # every shape fits before the first point
        check_compressible(data.model, SparsityConfig(pattern, config.allocation))
    baseline = evaluate(data.model, data)
    points = []
    for pattern, method in config.points():
        t0 = time.perf_counter()
        model = copy.deepcopy(data.model)
        extra = SPARSITY_RUNNERS[method](model, pattern, data, config)
        layers = compressed_layers(model)
        weights = torch.cat([m.compressed_weight().detach().reshape(-1) for m in layers.values()])
        metric = evaluate(model, data)
        level = getattr(pattern, "sparsity", None)
        point = {
            "pattern": str(pattern), "method": method, "allocation": config.allocation,
            "structure": str(pattern).split(":")[0], "level": level, "sparsity": sparsity_of(weights),
            "metric": metric, "delta": metric - baseline, "layers": len(layers),
            **extra, "seconds": time.perf_counter() - t0, "command": command_line(),
        }
        points.append(point)
        merge_results(config.output, "sparsity", make_section(config, data, baseline, [point], start, finished=False),
                      key=SPARSITY_KEY)  # at once, as in the quantization sweep
        print(f"{str(pattern):22s} {method:8s} {data.task.metrics[0]} {metric:6.2f} ({metric - baseline:+.2f})", flush=True)
    section = make_section(config, data, baseline, points, start)
    merged = merge_results(config.output, "sparsity", section, key=SPARSITY_KEY)
    if config.plot:
        plot_sparsity(merged["sparsity"], config.plot)
    return merged["sparsity"]


__all__ = [
    "QUANT_METHODS",
    "SPARSITY_METHODS",
    "QuantSweepConfig",
    "SparsitySweepConfig",
    "SweepData",
    "evaluate",
    "expand_pattern",
    "quant_sweep",
    "sparsity_sweep",
]
