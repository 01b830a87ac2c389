"""Compression during training, as :class:`deftune.train.TrainExtension` objects.

* :class:`CompressionExtension` — quantization- or sparsity-aware fine-tuning through the STE: full
  fine-tuning (latent weights train, ``f(W)`` is used in the forward), or PEFT/DEFT on a frozen
  compressed base (QLoRA-style: ``prepare`` runs after the PEFT method is applied and compresses the
  frozen base layers; adapters stay in full precision).
* :class:`GradualPruning` — gradual magnitude pruning with the cubic schedule of Zhu & Gupta 2017
  ("To prune, or not to prune", arXiv 1710.01878): ``s_t = s_f + (s_i - s_f)(1 - (t - t0)/(t1 - t0))^3``.
* :class:`DynamicSparsity` — dynamic sparse training at constant sparsity: SET (Mocanu et al. 2018;
  drop by magnitude, grow at random) and RigL (Evci et al. 2020, arXiv 1911.11134; drop by
  magnitude, grow where the dense gradient is largest, new weights start at zero; the drop fraction
  decays as ``alpha/2 (1 + cos(pi t / T_end))``).

The extensions act inside ``extra_loss(model, step)`` (between forward and backward of ``step``):
pruned latent weights are projected to zero and masks are updated there, taking effect from the
next step. RigL reads the dense gradient of the previous step, captured by a gradient hook on the
latent weights (the STE makes it dense). Call ``close()`` after training: it removes RigL's hooks and
zeroes the pruned latent weights that the last optimizer step moved (:func:`finetune` does this).

:func:`finetune` is a small loop with the same extension protocol, for recovery fine-tuning of an
already fine-tuned, compressed model (``train_glue`` starts from the pre-trained model).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from deftune.compress.layer import CompressedLinear, MaskCompressor, QuantCompressor
from deftune.compress.model import (
    CompressConfig,
    CompressReport,
    FilterFn,
    SparsityConfig,
    compress_,
    decompress_,
)
from deftune.compress.patterns import FRACTIONAL, Unstructured, parse_sparsity, with_sparsity
from deftune.compress.sparsity import ALLOCATIONS, Allocation, allocate, compute_mask, sparsity_of


def _masked_layers(model: nn.Module) -> dict[str, tuple[CompressedLinear, MaskCompressor]]:
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, CompressedLinear):
            masks = m.parts(MaskCompressor)
            if masks:
                out[name] = (m, masks[0])
    return out


@torch.no_grad()
def _project(layers: Mapping[str, tuple[CompressedLinear, MaskCompressor]]) -> None:
    for layer, masker in layers.values():
        layer.weight.mul_(masker.mask.to(layer.weight.dtype))


class _SavesCompressed:
    """``before_save``: every compressed layer becomes a plain Linear holding its compressed weight
    (what the run evaluated), so the saved run loads as a plain model and computes what was
    measured (its latent weights and compressor buffers are not saved)."""

    def before_save(self, model: nn.Module) -> None:
        decompress_(model, materialize=True)


class CompressionExtension(_SavesCompressed):
    """Compress the model in ``prepare`` (STE wrappers), then train as usual.

    Args:
        config: :class:`QuantConfig` (use ``freeze=False`` for QAT of trainable weights) or
            :class:`SparsityConfig` (a fixed mask; pruned latent weights are kept at zero).
        filter_fn: which Linear layers (default: those of the transformer blocks).
        calibration: batches for reconstruction, if the config asks for one.
    """

    def __init__(self, config: CompressConfig, filter_fn: FilterFn | None = None, calibration=None) -> None:
        self.config = config
        self.filter_fn = filter_fn
        self.calibration = calibration
        self.report: CompressReport | None = None
        self._masked: dict = {}

    def prepare(self, model: nn.Module) -> None:
        self.report = compress_(model, self.config, self.filter_fn, calibration=self.calibration)
        self._masked = _masked_layers(model)

    def extra_loss(self, model: nn.Module, step: int) -> Tensor | None:
        _project(self._masked)
        return None

    def trainable_parameters(self) -> list[nn.Parameter]:
        return []

    def state_dict(self) -> dict:
        return {}

    def log(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        """After training: zero the pruned latent weights that the last optimizer step moved."""
        _project(self._masked)


def polynomial_sparsity(step: int, final: float, start: int, end: int, initial: float = 0.0, power: int = 3) -> float:
    """Zhu & Gupta's schedule: ``initial`` before ``start``, ``final`` after ``end``, polynomial between."""
    if step <= start:
        return initial
    if step >= end:
        return final
    frac = (step - start) / (end - start)
    return final + (initial - final) * (1.0 - frac) ** power


def _check_allocation(allocation: str) -> None:
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation {allocation!r} is not one of {list(ALLOCATIONS)}")


@dataclass(frozen=True)
class PruningSchedule:
    """Gradual magnitude pruning settings.

    Attributes:
        pattern: the structure and *final* sparsity (``unstructured:0.5``, ``block:4x4:0.8``, ``channel:0.3``).
        start_step, end_step: the schedule's span; every: steps between mask updates.
        initial_sparsity: sparsity at ``start_step``. allocation: across layers (uniform, global, erk).
    """

    pattern: str = "unstructured:0.5"
    start_step: int = 0
    end_step: int = 100
    every: int = 10
    initial_sparsity: float = 0.0
    allocation: Allocation = "uniform"

    def __post_init__(self) -> None:
        p = parse_sparsity(self.pattern)
        if not isinstance(p, FRACTIONAL):
            raise ValueError(f"gradual pruning needs a fraction-based pattern (unstructured, block, channel), got {p}")
        if not (0 <= self.start_step < self.end_step) or self.every < 1:
            raise ValueError(f"need 0 <= start_step < end_step and every >= 1, got {self}")
        if not (0.0 <= self.initial_sparsity <= p.sparsity):
            raise ValueError(f"initial_sparsity {self.initial_sparsity} must be in [0, final {p.sparsity}]")
        _check_allocation(self.allocation)


class GradualPruning(_SavesCompressed):
    """Gradual magnitude pruning (Zhu & Gupta 2017) of the chosen Linear layers of a model."""

    def __init__(self, schedule: PruningSchedule, filter_fn: FilterFn | None = None) -> None:
        self.schedule = schedule
        self.final = parse_sparsity(schedule.pattern)
        self.filter_fn = filter_fn
        self.current = schedule.initial_sparsity
        self._layers: dict = {}

    def prepare(self, model: nn.Module) -> None:
        start = with_sparsity(self.final, self.schedule.initial_sparsity)
        compress_(model, SparsityConfig(start, self.schedule.allocation), self.filter_fn)
        self._layers = _masked_layers(model)

    @torch.no_grad()
    def update(self, step: int) -> None:
        s = self.schedule
        target = polynomial_sparsity(step, self.final.sparsity, s.start_step, s.end_step, s.initial_sparsity)
        on_grid = (step - s.start_step) % s.every == 0 or step == s.end_step
        if s.start_step <= step <= s.end_step and on_grid and target != self.current:
            weights = {n: layer.weight for n, (layer, _) in self._layers.items()}
            plan = allocate(weights, with_sparsity(self.final, target), s.allocation)
            for name, (layer, masker) in self._layers.items():
                masker.update(compute_mask(layer.weight, plan[name]), plan[name])
            self.current = target

    def extra_loss(self, model: nn.Module, step: int) -> Tensor | None:
        self.update(step)
        _project(self._layers)
        return None

    def trainable_parameters(self) -> list[nn.Parameter]:
        return []

    def state_dict(self) -> dict:
        return {f"{n}.mask": m.mask for n, (_, m) in self._layers.items()}

    def log(self) -> dict[str, float]:
        return {"target_sparsity": self.current, "weight_sparsity": self.sparsity()}

    def sparsity(self) -> float:
        kept = sum(int(m.mask.sum()) for _, m in self._layers.values())
        total = sum(m.mask.numel() for _, m in self._layers.values())
        return 1.0 - kept / max(total, 1)

    def close(self) -> None:
        """After training: zero the pruned latent weights that the last optimizer step moved."""
        _project(self._layers)


@dataclass(frozen=True)
class DynamicSchedule:
    """SET / RigL settings.

    Attributes:
        algorithm: ``set`` (grow at random) or ``rigl`` (grow by gradient magnitude).
        sparsity: constant unstructured sparsity; allocation: across layers (uniform, global, erk).
        every: steps between updates (RigL's Delta T); drop_fraction: alpha, decayed with a cosine;
        end_step: no updates from this step on (RigL's T_end).
    """

    algorithm: Literal["set", "rigl"] = "rigl"
    sparsity: float = 0.5
    allocation: Allocation = "uniform"
    every: int = 50
    drop_fraction: float = 0.3
    end_step: int = 1000

    def __post_init__(self) -> None:
        if self.algorithm not in ("set", "rigl"):
            raise ValueError(f"algorithm {self.algorithm!r} is not one of ['set', 'rigl']")
        if not (0.0 < self.sparsity < 1.0) or not (0.0 < self.drop_fraction <= 1.0):
            raise ValueError(f"need 0 < sparsity < 1 and 0 < drop_fraction <= 1, got {self}")
        if self.every < 1 or self.end_step < 1:
            raise ValueError(f"every and end_step must be >= 1, got {self}")
        _check_allocation(self.allocation)


class DynamicSparsity(_SavesCompressed):
    """SET or RigL on the chosen Linear layers, at constant sparsity (unstructured masks)."""

    def __init__(self, schedule: DynamicSchedule, filter_fn: FilterFn | None = None, seed: int = 0) -> None:
        self.schedule = schedule
        self.filter_fn = filter_fn
        self.gen = torch.Generator().manual_seed(seed)
        self._layers: dict = {}
        self._grads: dict[str, Tensor] = {}
        self._handles: list = []
        self._capture = False
        self.updates = 0
        self.changed = 0

    def prepare(self, model: nn.Module) -> None:
        s = self.schedule
        compress_(model, SparsityConfig(Unstructured(s.sparsity), s.allocation), self.filter_fn)
        self._layers = _masked_layers(model)
        if s.algorithm == "rigl":
            for name, (layer, _) in self._layers.items():
                self._handles.append(layer.weight.register_post_accumulate_grad_hook(self._grad_hook(name)))

    def _grad_hook(self, name: str) -> Callable[[Tensor], None]:
        def hook(param: Tensor) -> None:
            if self._capture and param.grad is not None:
                self._grads[name] = param.grad.detach().clone()  # dense, thanks to the STE

        return hook

    def drop_fraction(self, step: int) -> float:
        s = self.schedule
        return s.drop_fraction / 2.0 * (1.0 + math.cos(math.pi * min(step, s.end_step) / s.end_step))

    @torch.no_grad()
    def update(self, step: int) -> None:
        frac = self.drop_fraction(step)
        for name, (layer, masker) in self._layers.items():
            active = masker.mask.reshape(-1)
            w = layer.weight.reshape(-1)
            n = min(int(frac * int(active.sum())), int((~active).sum()))
            if n == 0:
                continue
            drop_score = torch.where(active, w.abs().float(), torch.inf)
            drop = torch.topk(drop_score, n, largest=False).indices
            if self.schedule.algorithm == "rigl":
                grad = self._grads.get(name)
                if grad is None:
                    raise RuntimeError(f"RigL has no gradient for {name}: was backward run before step {step}?")
                grow_score = grad.reshape(-1).abs().float()
            else:
                grow_score = torch.rand(w.shape, generator=self.gen).to(w.device)
            grow_score = torch.where(active, -torch.inf, grow_score)  # only connections inactive before
            grow = torch.topk(grow_score, n).indices
            new = active.clone()
            new[drop] = False
            new[grow] = True
            w[grow] = 0.0  # new connections start at zero
            masker.update(new.reshape(masker.mask.shape))
            self.changed += n
        self.updates += 1
        self._grads.clear()

    def extra_loss(self, model: nn.Module, step: int) -> Tensor | None:
        s = self.schedule
        if 0 < step < s.end_step and step % s.every == 0:
            self.update(step)
        self._capture = (step + 1) % s.every == 0  # keep this step's gradient for the next update
        _project(self._layers)
        return None

    def trainable_parameters(self) -> list[nn.Parameter]:
        return []

    def state_dict(self) -> dict:
        return {f"{n}.mask": m.mask for n, (_, m) in self._layers.items()}

    def log(self) -> dict[str, float]:
        return {"weight_sparsity": self.sparsity(), "mask_updates": float(self.updates)}

    def sparsity(self) -> float:
        return sparsity_of(torch.cat([m.mask.reshape(-1) for _, m in self._layers.values()]))

    def close(self) -> None:
        """After training: remove the gradient hooks (RigL) and zero the pruned latent weights."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        _project(self._layers)


@torch.no_grad()
def freeze_quantizers_(model: nn.Module) -> int:
    """End of QAT ("convert"): fix every dynamic quantizer's scales to the weight it sees now.

    A quantizer inside a chain (``nn.Sequential(mask, quant)``) is frozen on the weight as the parts
    before it leave it, the same tensor its dynamic scales were computed from, so the model's
    output does not change at the freeze.
    """
    n = 0
    for m in model.modules():
        if not isinstance(m, CompressedLinear):
            continue
        chain = list(m.compressor) if isinstance(m.compressor, nn.Sequential) else [m.compressor]
        w = m.weight.detach()
        for part in chain:
            if isinstance(part, QuantCompressor) and not part.frozen:
                part.freeze(w)
                n += 1
            w = part(w)
    return n


# ---- a small loop for recovery fine-tuning ------------------------------------------------------------


@dataclass(frozen=True)
class FinetuneConfig:
    """Recovery fine-tuning of an already trained model.

    Attributes:
        steps: optimizer steps; lr: peak AdamW learning rate (linear warm-up then linear decay);
        warmup_steps; weight_decay; seed: batch order.
    """

    steps: int = 200
    lr: float = 3e-5
    warmup_steps: int = 20
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.lr <= 0 or self.warmup_steps < 0:
            raise ValueError(f"need steps >= 1, lr > 0, warmup_steps >= 0; got {self}")


def finetune(model: nn.Module, batches: Sequence[Mapping[str, Tensor]], config: FinetuneConfig, extensions=()) -> list[float]:
    """Train every parameter that requires grad on ``batches`` (cycled, reshuffled each epoch).

    Extensions follow the :class:`deftune.train.TrainExtension` protocol. Returns the losses.
    """
    for ext in extensions:
        ext.prepare(model)
    params = [p for p in model.parameters() if p.requires_grad]
    params += [p for ext in extensions for p in ext.trainable_parameters()]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    warm, total = config.warmup_steps, config.steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: min(1.0, (t + 1) / warm) if t < warm else max(0.0, (total - t) / max(1, total - warm))
    )
    rng = random.Random(config.seed)
    order: list[int] = []
    device = next(model.parameters()).device
    losses = []
    model.train()
    try:
        for step in range(config.steps):
            if not order:
                order = list(range(len(batches)))
                rng.shuffle(order)
            batch = {k: v.to(device) for k, v in batches[order.pop()].items()}
            loss = model(**batch).loss
            for ext in extensions:
                term = ext.extra_loss(model, step)
                if term is not None:
                    loss = loss + term
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
    finally:
        model.eval()
        for ext in extensions:
            if hasattr(ext, "close"):
                ext.close()
    return losses
