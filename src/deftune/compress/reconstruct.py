"""Calibration activations and layer-wise reconstruction.

:func:`capture_inputs` runs calibration batches through a model with forward pre-hooks on chosen
Linear layers and collects, over *real* tokens only (padding excluded through the attention mask),

* the Hessian proxy ``H = (2 / N) sum_t x_t x_t^T`` (in, in), for GPTQ, and
* a random sample of input rows ``X`` (rows, in), for MSE reconstruction and error reports.

:func:`reconstruct_mse` is reconstruction (a) of the issue: a few Adam steps on the latent weight
``W'`` of a compressed layer, minimising ``||X W^T - X f(W')^T||^2`` through the straight-through
estimator, with the compressor ``f`` (frozen quantization parameters or a mask) held fixed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from deftune.compress.ste import ste
from deftune.density import align_mask, module_stack, stack_masks


@dataclass
class LayerCalibration:
    """Inputs seen by one layer: ``hessian`` (in, in) or None, ``samples`` (rows, in), token count."""

    hessian: Tensor | None
    samples: Tensor
    n_tokens: int


@dataclass(frozen=True)
class MSEOptions:
    """Options of :func:`reconstruct_mse`.

    Attributes:
        steps: Adam steps.
        lr: learning rate relative to the weight's standard deviation.
        batch_rows: input rows per step (a random subset of the calibration sample).
        eval_every: steps between full-sample checks (the best latent weight is kept).
    """

    steps: int = 50
    lr: float = 5e-3
    batch_rows: int = 512
    eval_every: int = 10

    def __post_init__(self) -> None:
        if self.steps < 0 or self.lr <= 0 or self.batch_rows < 1 or self.eval_every < 1:
            raise ValueError(f"MSEOptions needs steps >= 0, lr > 0, batch_rows >= 1, eval_every >= 1; got {self}")


@torch.no_grad()
def capture_inputs(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    batches: Sequence[Mapping[str, Tensor]],
    *,
    hessian: bool = True,
    max_samples: int = 2048,
    seed: int = 0,
) -> dict[str, LayerCalibration]:
    """Inputs of each module in ``layers`` (name -> module of ``model``) over the calibration
    ``batches``, real tokens only: each layer is masked by its own stack's tokens (an encoder–decoder
    model's decoder layers by ``decoder_attention_mask`` or ``labels != -100``; see
    :func:`deftune.density.stack_masks`)."""
    if not batches:
        raise ValueError("calibration needs at least one batch")
    gen = torch.Generator().manual_seed(seed)
    per_batch = math.ceil(max_samples / len(batches))
    enc_dec = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    paths = {id(m): n for n, m in model.named_modules()} if enc_dec else {}
    stacks = {name: module_stack(paths.get(id(module), name), enc_dec) for name, module in layers.items()}
    masks: dict[str, Tensor | None] = {}
    sums: dict[str, Tensor] = {}
    samples: dict[str, list[Tensor]] = {n: [] for n in layers}
    counts: dict[str, int] = {n: 0 for n in layers}

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            mask = align_mask(masks.get(stacks[name]), x)
            rows = x[mask] if mask is not None else x.reshape(-1, x.shape[-1])  # (tokens, in)
            rows = rows.float()
            counts[name] += rows.shape[0]
            if hessian:
                xtx = rows.T @ rows  # (in, in)
                sums[name] = sums[name] + xtx if name in sums else xtx
            take = torch.randperm(rows.shape[0], generator=gen)[:per_batch]
            samples[name].append(rows[take.to(rows.device)].cpu())

        return hook

    handles = []
    was_training = model.training
    try:
        model.eval()
        for name, module in layers.items():
            handles.append(module.register_forward_pre_hook(make_hook(name)))
        device = next(model.parameters()).device
        for batch in batches:
            moved = {k: v.to(device) for k, v in batch.items()}  # once: the masks and the forward share it
            masks = stack_masks(moved, enc_dec)
            model(**_forward_inputs(moved, enc_dec))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out = {}
    for name in layers:
        if counts[name] == 0:
            raise RuntimeError(f"layer {name!r} saw no input during calibration (is it used by the model?)")
        h = 2.0 * sums[name] / counts[name] if hessian else None
        out[name] = LayerCalibration(h, torch.cat(samples[name])[:max_samples], counts[name])
    return out


def _forward_inputs(batch: dict[str, Tensor], enc_dec: bool) -> dict[str, Tensor]:
    """The batch without ``labels``, except where an encoder–decoder model builds its decoder input
    from them (no ``decoder_input_ids``: T5 shifts the labels right)."""
    if enc_dec and "decoder_input_ids" not in batch and "decoder_inputs_embeds" not in batch:
        return batch
    return {k: v for k, v in batch.items() if k != "labels"}


def reconstruct_mse(
    weight: Tensor,
    samples: Tensor,
    compressor: nn.Module,
    options: MSEOptions = MSEOptions(),
    seed: int = 0,
) -> Tensor:
    """A latent weight ``W'`` such that ``f(W')`` reproduces the layer's outputs ``X W^T``.

    ``weight`` (out, in), ``samples`` (rows, in); ``compressor`` is ``f`` (kept fixed). Adam with a
    cosine-decayed learning rate; the full-sample error is checked every ``eval_every`` steps and
    the best latent weight is returned, so the result is never worse than ``f(W)`` on the sample
    (straight-through training oscillates around rounding boundaries).
    """
    gen = torch.Generator().manual_seed(seed)
    w0 = weight.detach().float()
    x_all = samples.to(w0.device).float()
    target_all = x_all @ w0.T  # (rows, out)
    scale = (target_all**2).mean().clamp_min(1e-12)

    def full_error(latent: Tensor) -> float:
        with torch.no_grad():
            return float(((x_all @ compressor(latent).T - target_all) ** 2).mean() / scale)

    latent = nn.Parameter(w0.clone())
    best, best_err = w0.clone(), full_error(w0)
    opt = torch.optim.Adam([latent], lr=options.lr * float(w0.std()))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / max(options.steps, 1))))
    with torch.enable_grad():
        for step in range(1, options.steps + 1):
            idx = torch.randperm(x_all.shape[0], generator=gen)[: options.batch_rows].to(x_all.device)
            x, target = x_all[idx], target_all[idx]
            out = x @ ste(latent, compressor).T  # (batch_rows, out)
            loss = ((out - target) ** 2).mean() / scale
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step % options.eval_every == 0 or step == options.steps:
                err = full_error(latent.detach())
                if err < best_err:
                    best, best_err = latent.detach().clone(), err
    return best


def output_error(weight: Tensor, approx: Tensor, samples: Tensor) -> float:
    """``||X W^T - X W_hat^T|| / ||X W^T||`` on the calibration sample."""
    x = samples.to(weight.device).float()
    ref = x @ weight.detach().float().T
    den = torch.linalg.vector_norm(ref).item()
    num = torch.linalg.vector_norm(ref - x @ approx.detach().float().T).item()
    return num / den if den > 0 else 0.0
