"""A Linear layer seen through a weight compressor, trainable with the straight-through estimator.

:class:`CompressedLinear` *wraps* an ``nn.Linear`` (it does not patch its ``forward``): it computes
``y = x @ f(W)^T + b`` where ``f`` is a compressor module acting on the weight —
:class:`QuantCompressor` (fake quantization), :class:`MaskCompressor` (a sparsity mask) or an
``nn.Sequential`` of both (mask, then quantize). With ``straight_through=True`` the weight is
``ste(W, f)``: the forward sees ``f(W)`` and the gradient reaches the latent ``W`` unchanged, which
is what quantization-aware training, gradual pruning and RigL's dense gradients need.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deftune.compress.patterns import QuantPattern, SparsityPattern
from deftune.compress.quant import QuantParams, choose_qparams, fake_quantize
from deftune.compress.ste import ste


class QuantCompressor(nn.Module):
    """Fake-quantizes a weight. Frozen parameters (buffers) if given, else recomputed every call."""

    def __init__(self, pattern: QuantPattern, params: QuantParams | None = None) -> None:
        super().__init__()
        self.pattern = pattern
        self.register_buffer("scale", None if params is None else params.scale.clone())
        self.register_buffer("zero_point", None if params is None else params.zero_point.clone())

    @property
    def frozen(self) -> bool:
        return self.scale is not None

    def params(self, w: Tensor) -> QuantParams:
        if self.frozen:
            return QuantParams(self.scale, self.zero_point, self.pattern, w.shape)
        return choose_qparams(w, self.pattern)

    def freeze(self, w: Tensor) -> None:
        """Fix the parameters to those of ``w`` (PTQ, or the end of quantization-aware training)."""
        p = choose_qparams(w, self.pattern)
        self.scale, self.zero_point = p.scale, p.zero_point

    def forward(self, w: Tensor) -> Tensor:
        return fake_quantize(w, self.params(w))

    def extra_repr(self) -> str:
        return f"{self.pattern}, frozen={self.frozen}"


class MaskCompressor(nn.Module):
    """Multiplies a weight by a fixed boolean keep-mask (updated by pruning schedules)."""

    def __init__(self, pattern: SparsityPattern, mask: Tensor) -> None:
        super().__init__()
        self.pattern = pattern
        self.register_buffer("mask", mask.detach().bool().clone())

    def update(self, mask: Tensor, pattern: SparsityPattern | None = None) -> None:
        if mask.shape != self.mask.shape:
            raise ValueError(f"new mask shape {tuple(mask.shape)} differs from {tuple(self.mask.shape)}")
        self.mask.copy_(mask.bool())
        if pattern is not None:
            self.pattern = pattern

    def forward(self, w: Tensor) -> Tensor:
        return w * self.mask.to(w.dtype)

    def extra_repr(self) -> str:
        return f"{self.pattern}, kept={int(self.mask.sum())}/{self.mask.numel()}"


class CompressedLinear(nn.Module):
    """``F.linear(x, f(W), b)`` for a Linear layer whose weight ``W`` is seen through ``f``.

    It takes over the wrapped ``nn.Linear``'s own ``weight`` and ``bias`` parameters (the same
    objects, so optimizers and state-dict keys keep working) and adds the ``compressor``.
    """

    def __init__(self, base: nn.Linear, compressor: nn.Module, straight_through: bool = True) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"CompressedLinear wraps nn.Linear, got {type(base).__name__}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # (out, in), the latent weight
        self.bias = base.bias
        self.compressor = compressor
        self.straight_through = straight_through

    def compressed_weight(self) -> Tensor:
        """``f(W)``; with the straight-through estimator its gradient reaches ``W`` unchanged."""
        return ste(self.weight, self.compressor) if self.straight_through else self.compressor(self.weight)

    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out)
        return F.linear(x, self.compressed_weight(), self.bias)

    def parts(self, kind: type) -> list[nn.Module]:
        """The compressor modules of one type (``QuantCompressor`` or ``MaskCompressor``)."""
        return [m for m in self.compressor.modules() if isinstance(m, kind)]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, straight_through={self.straight_through}"

    @torch.no_grad()
    def to_linear(self, materialize: bool = True) -> nn.Linear:
        """A plain ``nn.Linear``: holding ``f(W)`` (``materialize``, for export or a frozen PEFT base)
        or sharing the latent ``W`` and bias parameters."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        if materialize:
            out.weight = nn.Parameter(self.compressor(self.weight.detach()).clone(), self.weight.requires_grad)
        else:
            out.weight = self.weight
        out.bias = self.bias
        return out


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Set the sub-module called ``name`` (dotted path) of ``model`` to ``new``."""
    model.set_submodule(name, new)
