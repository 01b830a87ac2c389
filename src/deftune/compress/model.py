"""The model-level verb: ``compress_(model, config, filter_fn=..., calibration=...)``.

It replaces the chosen ``nn.Linear`` layers, in place, by :class:`CompressedLinear` wrappers and
returns a per-layer :class:`CompressReport`. The method is chosen by the config's type through a
small registry (:func:`register_compression`): :class:`QuantConfig` and :class:`SparsityConfig`. Each
method has a ``plan`` (one pattern per layer, e.g. a sparsity allocation) and an ``apply`` (the
new latent weight and the compressor of one layer, optionally reconstructed on calibration data).

With calibration batches and ``sequential=True``, layers are processed one transformer block at a
time and each block's inputs are captured from the model whose earlier blocks are already
compressed, as GPTQ does (Frantar et al. 2022, Sec. 4).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from deftune.compress.errors import relative_error, sqnr_db
from deftune.compress.gptq import GPTQOptions, gptq_quantize
from deftune.compress.layer import CompressedLinear, MaskCompressor, QuantCompressor, replace_module
from deftune.compress.patterns import Pattern, PatternError, QuantPattern, SparsityPattern, parse_pattern
from deftune.compress.quant import choose_qparams
from deftune.compress.reconstruct import (
    LayerCalibration,
    MSEOptions,
    capture_inputs,
    output_error,
    reconstruct_mse,
)
from deftune.compress.sparsity import Allocation, allocate, check_allocation, compute_mask, sparsity_of

FilterFn = Callable[[nn.Module, str], bool]
HEAD_NAMES = ("classifier", "score", "lm_head", "qa_outputs")
_BLOCK_RE = re.compile(r"\.(?:layer|layers|h|block|blocks)\.(\d+)\.")


# ---- configs ---------------------------------------------------------------------------------------


@dataclass
class QuantConfig:
    """Weight quantization of Linear layers.

    Attributes:
        pattern: a :class:`QuantPattern` or its string (``"int4:g128:asym"``).
        reconstruct: ``none`` (round to nearest), ``gptq`` (Hessian-based, needs calibration) or
            ``mse`` (a few STE steps per layer on calibration inputs).
        freeze: fix the scales after compression (PTQ); ``False`` recomputes them from the weights at
            every forward (quantization-aware training).
        gptq: GPTQ options. mse: MSE-reconstruction options.
        sequential: with reconstruction, capture each block's calibration inputs after compressing the
            earlier blocks.
    """

    pattern: QuantPattern | str
    reconstruct: Literal["none", "gptq", "mse"] = "none"
    freeze: bool = True
    gptq: GPTQOptions = field(default_factory=GPTQOptions)
    mse: MSEOptions = field(default_factory=MSEOptions)
    sequential: bool = True

    def __post_init__(self) -> None:
        self.pattern = parse_pattern(self.pattern)
        if not isinstance(self.pattern, QuantPattern):
            raise ValueError(f"QuantConfig needs a quantization pattern such as int4:g128, got {self.pattern}")
        if self.reconstruct not in ("none", "gptq", "mse"):
            raise ValueError(f"reconstruct {self.reconstruct!r} is not one of ['none', 'gptq', 'mse']")
        if self.reconstruct != "none" and not self.freeze:
            raise ValueError("reconstruction fixes the quantization grid: it needs freeze=True")


@dataclass
class SparsityConfig:
    """Weight sparsity of Linear layers.

    Attributes:
        pattern: a sparsity pattern or its string (``"unstructured:0.5"``, ``"nm:2:4"``).
        allocation: ``uniform``, ``global`` or ``erk`` (see :func:`deftune.compress.sparsity.allocate`).
        reconstruct: ``none`` (magnitude pruning) or ``mse`` (refit the kept weights on calibration inputs).
        mse: MSE-reconstruction options. sequential: as in :class:`QuantConfig`.
    """

    pattern: SparsityPattern | str
    allocation: Allocation = "uniform"
    reconstruct: Literal["none", "mse"] = "none"
    mse: MSEOptions = field(default_factory=MSEOptions)
    sequential: bool = True

    def __post_init__(self) -> None:
        self.pattern = parse_pattern(self.pattern)
        if isinstance(self.pattern, QuantPattern):
            raise ValueError(f"SparsityConfig needs a sparsity pattern such as nm:2:4, got {self.pattern}")
        check_allocation(self.pattern, self.allocation)
        if self.reconstruct not in ("none", "mse"):
            raise ValueError(
                f"reconstruct {self.reconstruct!r} is not one of ['none', 'mse'] for sparsity "
                "(GPTQ is a quantization method)"
            )


CompressConfig = QuantConfig | SparsityConfig


# ---- method registry ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Compression:
    """``plan(config, weights) -> {name: pattern}``; ``apply(config, pattern, weight, calib) -> (W', f)``."""

    plan: Callable[[CompressConfig, Mapping[str, Tensor]], dict[str, Pattern]]
    apply: Callable[[CompressConfig, Pattern, Tensor, LayerCalibration | None], tuple[Tensor, nn.Module]]


#: config type -> how to compress with it (:class:`QuantConfig`, :class:`SparsityConfig`, and any
#: registered with :func:`register_compression`)
COMPRESSIONS: dict[type, Compression] = {}


def register_compression(
    config_type: type,
    plan: Callable[[CompressConfig, Mapping[str, Tensor]], dict[str, Pattern]],
    apply: Callable[[CompressConfig, Pattern, Tensor, LayerCalibration | None], tuple[Tensor, nn.Module]],
) -> Compression:
    """Make ``compress_`` accept configs of ``config_type``: ``plan`` gives each layer its pattern,
    ``apply`` returns a layer's new latent weight and its compressor module."""
    COMPRESSIONS[config_type] = Compression(plan, apply)
    return COMPRESSIONS[config_type]


def _quant_plan(cfg: QuantConfig, weights: Mapping[str, Tensor]) -> dict[str, Pattern]:
    return {name: cfg.pattern for name in weights}


def _quant_apply(cfg: QuantConfig, pattern: QuantPattern, w: Tensor, calib: LayerCalibration | None):
    if cfg.reconstruct == "gptq":
        q, params = gptq_quantize(w, calib.hessian, pattern, cfg.gptq)
        return q.to(w.dtype), QuantCompressor(pattern, params)
    params = choose_qparams(w, pattern)
    compressor = QuantCompressor(pattern, params if cfg.freeze else None)
    if cfg.reconstruct == "mse":
        return reconstruct_mse(w, calib.samples, compressor, cfg.mse).to(w.dtype), compressor
    return w, compressor


def _sparsity_plan(cfg: SparsityConfig, weights: Mapping[str, Tensor]) -> dict[str, Pattern]:
    return allocate(weights, cfg.pattern, cfg.allocation)


def _sparsity_apply(cfg: SparsityConfig, pattern: SparsityPattern, w: Tensor, calib: LayerCalibration | None):
    compressor = MaskCompressor(pattern, compute_mask(w, pattern))
    if cfg.reconstruct == "mse":
        w = reconstruct_mse(w, calib.samples, compressor, cfg.mse).to(w.dtype)
    return compressor(w), compressor  # pruned latent weights are zero, not just masked


register_compression(QuantConfig, _quant_plan, _quant_apply)
register_compression(SparsityConfig, _sparsity_plan, _sparsity_apply)


# ---- report --------------------------------------------------------------------------------------------


@dataclass
class LayerReport:
    """One compressed layer: pattern, weight error, output error on calibration inputs, sparsity."""

    name: str
    shape: tuple[int, int]
    pattern: str
    weight_rel_error: float
    weight_sqnr_db: float
    output_rel_error: float | None
    sparsity: float
    fp32_bytes: int


@dataclass
class CompressReport:
    config: str
    layers: list[LayerReport]
    seconds: float = 0.0

    @property
    def mean_output_error(self) -> float | None:
        errs = [lr.output_rel_error for lr in self.layers if lr.output_rel_error is not None]
        return sum(errs) / len(errs) if errs else None

    @property
    def sparsity(self) -> float:
        """Fraction of zero weights over all compressed layers."""
        total = sum(math.prod(lr.shape) for lr in self.layers)
        return sum(lr.sparsity * math.prod(lr.shape) for lr in self.layers) / max(total, 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sparsity"] = self.sparsity
        d["mean_output_rel_error"] = self.mean_output_error
        for lr in d["layers"]:
            if math.isinf(lr["weight_sqnr_db"]):
                lr["weight_sqnr_db"] = None
        return d

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def table(self) -> str:
        lines = [f"{'layer':58s} {'pattern':22s} {'w-err':>7s} {'SQNR':>6s} {'out-err':>7s} {'sparse':>6s}"]
        for lr in self.layers:
            out = "-" if lr.output_rel_error is None else f"{lr.output_rel_error:.4f}"
            lines.append(
                f"{lr.name[-58:]:58s} {lr.pattern:22s} {lr.weight_rel_error:7.4f} "
                f"{lr.weight_sqnr_db:6.1f} {out:>7s} {lr.sparsity:6.3f}"
            )
        return "\n".join(lines)


# ---- the verb ------------------------------------------------------------------------------------------


def _adapter_module_ids(model: nn.Module) -> set[int]:
    """ids of PEFT adapter sub-modules (``lora_A`` ...), named by each tuner layer's contract attribute."""
    ids: set[int] = set()
    for m in model.modules():
        for attr in getattr(m, "adapter_layer_names", ()):
            sub = getattr(m, attr, None)
            if isinstance(sub, nn.Module):
                ids.update(id(x) for x in sub.modules())
    return ids


def default_filter(module: nn.Module, name: str) -> bool:
    """Linear layers inside the numbered transformer blocks (not the task head nor the pooler)."""
    return isinstance(module, nn.Linear) and _BLOCK_RE.search(f".{name}.") is not None and not any(
        part in HEAD_NAMES for part in name.split(".")
    )


def select_linears(model: nn.Module, filter_fn: FilterFn | None = None) -> dict[str, nn.Linear]:
    """name -> ``nn.Linear`` chosen by ``filter_fn`` (PEFT adapter layers excluded)."""
    chosen = filter_fn or default_filter
    skip = _adapter_module_ids(model)
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and id(m) not in skip and chosen(m, name)
    }


def _refuse_shared_weights(model: nn.Module, targets: Mapping[str, nn.Linear]) -> None:
    """Compression rewrites a layer's weight in place: a weight tied to another module (an ``lm_head``
    tied to the input embedding) would change that module too, so it is refused before any change."""
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    for name, linear in targets.items():
        names = owners.get(id(linear.weight), [])
        if len(names) > 1:
            others = [n for n in names if n != f"{name}.weight"]
            raise ValueError(
                f"layer {name!r} shares its weight with {others}: compressing it would change those too "
                "(no layer was changed). Exclude it with filter_fn, or untie the weights first "
                "(e.g. config.tie_word_embeddings=False and a cloned lm_head weight)"
            )


def _stages(names: Sequence[str], sequential: bool) -> list[list[str]]:
    if not sequential:
        return [list(names)]
    stages: dict[str, list[str]] = {}
    for n in names:
        m = _BLOCK_RE.search(f".{n}.")
        stages.setdefault(f".{n}."[: m.end()] if m else n, []).append(n)  # e.g. ".bert.encoder.layer.3."
    return list(stages.values())


def _checked_plan(
    model: nn.Module, config: CompressConfig, filter_fn: FilterFn | None
) -> tuple[Compression, dict[str, nn.Linear], dict[str, Pattern]]:
    method = COMPRESSIONS.get(type(config))
    if method is None:
        raise TypeError(f"no compression method for {type(config).__name__}; registered: {[t.__name__ for t in COMPRESSIONS]}")
    targets = select_linears(model, filter_fn)
    if not targets:
        raise ValueError(
            "the filter selected no nn.Linear layer to compress (GPT-2's Conv1D layers are not nn.Linear "
            "and are not supported)"
        )
    _refuse_shared_weights(model, targets)
    plan = method.plan(config, {n: m.weight for n, m in targets.items()})
    for name, linear in targets.items():
        try:
            plan[name].check_shape(linear.weight.shape)
        except PatternError as err:
            raise PatternError(f"layer {name!r}: {err} (no layer was changed)") from None
        if not bool(torch.isfinite(linear.weight).all()):
            raise ValueError(f"layer {name!r} has non-finite weights (NaN or inf): nothing to compress (no layer was changed)")
    return method, targets, plan


def check_compressible(model: nn.Module, config: CompressConfig, filter_fn: FilterFn | None = None) -> None:
    """Raise, changing nothing, where :func:`compress_` would refuse ``config`` on ``model``: no layer
    selected, a weight shared with another module, a shape the pattern does not fit (naming the
    layer), non-finite weights. Sweeps call it for every point before they run the first."""
    _checked_plan(model, config, filter_fn)


def compress_(
    model: nn.Module,
    config: CompressConfig,
    filter_fn: FilterFn | None = None,
    *,
    calibration: Sequence[Mapping[str, Tensor]] | None = None,
    straight_through: bool = True,
    max_samples: int = 2048,
) -> CompressReport:
    """Compress the chosen Linear layers of ``model`` in place and report the per-layer error.

    Args:
        model: any ``nn.Module`` (a ``transformers`` model, possibly wrapped by ``peft``).
        config: :class:`QuantConfig` or :class:`SparsityConfig`.
        filter_fn: ``(module, name) -> bool``; default :func:`default_filter`.
        calibration: batches of model inputs; needed for reconstruction, and when given the report
            also holds each layer's output error on them.
        straight_through: the wrappers pass gradients to the latent weights (QAT/SAT, RigL).
        max_samples: calibration input rows kept per layer.
    """
    import time

    start = time.perf_counter()
    if config.reconstruct != "none" and calibration is None:
        raise ValueError(f"reconstruct={config.reconstruct!r} needs calibration batches")
    method, targets, plan = _checked_plan(model, config, filter_fn)
    need_hessian = config.reconstruct == "gptq"
    layers: list[LayerReport] = []
    sequential = config.sequential and config.reconstruct != "none"  # RTN needs inputs only for the report
    for stage in _stages(list(targets), sequential):
        calib = (
            capture_inputs(model, {n: targets[n] for n in stage}, calibration, hessian=need_hessian, max_samples=max_samples)
            if calibration is not None
            else {}
        )
        for name in stage:
            linear = targets[name]
            original = linear.weight.detach().clone()
            with torch.no_grad():
                new_w, compressor = method.apply(config, plan[name], original, calib.get(name))
                linear.weight.copy_(new_w)
                compressor = compressor.to(original.device)
                effective = compressor(linear.weight)
            replace_module(model, name, CompressedLinear(linear, compressor, straight_through))
            c = calib.get(name)
            layers.append(
                LayerReport(
                    name=name,
                    shape=tuple(original.shape),
                    pattern=str(plan[name]),
                    weight_rel_error=relative_error(original, effective),
                    weight_sqnr_db=sqnr_db(original, effective),
                    output_rel_error=None if c is None else output_error(original, effective, c.samples),
                    sparsity=sparsity_of(effective),
                    fp32_bytes=original.numel() * 4,
                )
            )
    label = f"{type(config).__name__}({config.pattern}, reconstruct={config.reconstruct})"
    return CompressReport(label, layers, time.perf_counter() - start)


def compressed_layers(model: nn.Module) -> dict[str, CompressedLinear]:
    """``{module path: wrapper}`` of the layers :func:`compress_` replaced in ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, CompressedLinear)}


def decompress_(model: nn.Module, materialize: bool = True) -> int:
    """Replace every :class:`CompressedLinear` by a plain Linear: with the compressed weight
    (``materialize``, e.g. to export or to put PEFT adapters on a frozen quantized base) or with
    its latent weight. Returns the number of layers replaced."""
    layers = compressed_layers(model)
    for name, layer in layers.items():
        replace_module(model, name, layer.to_linear(materialize))
    return len(layers)
