"""Real low-bit storage: int8 (one code per byte) and int4 (two codes per byte) Linear weights.

:class:`PackedLinear` keeps only the packed codes (``uint8``), one float32 scale per group and, for
asymmetric patterns, one ``uint8`` zero-point per group; the float weight is rebuilt at every
forward with the same float32 expression as fake quantization, so a packed model's outputs equal
the fake-quantized model's. Memory savings are real and measured with :meth:`PackedLinear.weight_bytes`.

Codes are stored unsigned, ``u = q - qmin`` (``qmin = -(2^(b-1)-1)`` symmetric, ``0`` asymmetric).
Bit widths 2-4 use the int4 container, 5-8 the int8 container (tighter 2/3-bit packing is not done).
Nibble order: element ``2k`` in the low four bits of byte ``k``, element ``2k+1`` in the high four.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deftune.compress.layer import CompressedLinear, QuantCompressor, replace_module
from deftune.compress.patterns import QuantPattern
from deftune.compress.quant import QuantParams, group_view, quantize, ungroup_view


def pack_int4(codes: Tensor) -> Tensor:
    """Pack unsigned 4-bit codes (``uint8`` values 0..15) along the last dim: ``(..., n) -> (..., ceil(n/2))``."""
    if codes.dtype != torch.uint8:
        raise TypeError(f"pack_int4 takes uint8 codes, got {codes.dtype}")
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError(f"int4 codes must be in 0..15, got a maximum of {int(codes.max())}")
    if codes.shape[-1] % 2:
        codes = F.pad(codes, (0, 1))  # a padding nibble of 0
    pairs = codes.reshape(*codes.shape[:-1], -1, 2)  # (..., n/2, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_int4(packed: Tensor, n: int) -> Tensor:
    """Inverse of :func:`pack_int4`: ``(..., ceil(n/2)) uint8 -> (..., n)`` codes 0..15."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], -1)[..., :n]


class PackedLinear(nn.Module):
    """A Linear layer whose weight is stored as packed int4/int8 codes plus per-group parameters."""

    def __init__(self, codes: Tensor, params: QuantParams, bias: Tensor | None) -> None:
        super().__init__()
        p = params.pattern
        if codes.dim() != 2:
            raise ValueError(f"PackedLinear needs a 2-D weight, got shape {tuple(codes.shape)}")
        self.pattern: QuantPattern = p
        self.out_features, self.in_features = codes.shape
        self.container_bits = 4 if p.bits <= 4 else 8
        unsigned = (codes.to(torch.int16) - p.qmin).to(torch.uint8)  # u = q - qmin >= 0
        packed = pack_int4(unsigned) if self.container_bits == 4 else unsigned
        self.register_buffer("packed", packed.contiguous())
        self.register_buffer("scale", params.scale.float().contiguous())
        zero = None if p.symmetric else params.zero_point.to(torch.uint8).contiguous()
        self.register_buffer("zero_point", zero)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def codes(self) -> Tensor:
        """Signed integer codes ``q`` as float32 (exact), shape ``(out, in)``."""
        u = unpack_int4(self.packed, self.in_features) if self.container_bits == 4 else self.packed
        return u.float() + self.pattern.qmin

    def dequantized_weight(self) -> Tensor:
        q = group_view(self.codes(), self.pattern)  # (G, L)
        w = q * self.scale if self.zero_point is None else (q - self.zero_point.float()) * self.scale
        return ungroup_view(w, self.pattern, torch.Size((self.out_features, self.in_features)))

    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out)
        w = self.dequantized_weight().to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def weight_bytes(self) -> int:
        """Bytes that store the weight: packed codes + scales + zero-points (bias excluded)."""
        zero = 0 if self.zero_point is None else self.zero_point.nbytes
        return self.packed.nbytes + self.scale.nbytes + zero

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.pattern}, container=int{self.container_bits}"


@dataclass
class PackedLayerReport:
    name: str
    pattern: str
    fp32_bytes: int
    packed_bytes: int


@dataclass
class PackReport:
    layers: list[PackedLayerReport]

    @property
    def fp32_bytes(self) -> int:
        return sum(lr.fp32_bytes for lr in self.layers)

    @property
    def packed_bytes(self) -> int:
        return sum(lr.packed_bytes for lr in self.layers)

    @property
    def ratio(self) -> float:
        return self.packed_bytes / max(self.fp32_bytes, 1)

    def to_dict(self) -> dict:
        return {
            "fp32_bytes": self.fp32_bytes,
            "packed_bytes": self.packed_bytes,
            "ratio": self.ratio,
            "layers": [asdict(lr) for lr in self.layers],
        }


def _quant_part(layer: CompressedLinear) -> tuple[nn.Module | None, QuantCompressor] | None:
    """``(pre, quantizer)`` when the layer's compressor ends in a quantizer, else None."""
    c = layer.compressor
    if isinstance(c, QuantCompressor):
        return None, c
    if isinstance(c, nn.Sequential) and len(c) and isinstance(c[-1], QuantCompressor):
        return c[:-1], c[-1]
    return None


@torch.no_grad()
def pack_(model: nn.Module) -> PackReport:
    """Replace every quantized :class:`CompressedLinear` by a :class:`PackedLinear`, in place.

    Layers whose quantizer is not frozen are frozen to their current weights first. Sparsity masks
    applied before the quantizer are kept: pruned weights quantize to the code of exact zero.
    """
    reports = []
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, CompressedLinear)]:
        parts = _quant_part(layer)
        if parts is None:
            continue
        pre, quantizer = parts
        w = layer.weight.detach().float()
        if pre is not None:
            w = pre(w)
        if not quantizer.frozen:
            quantizer.freeze(w)
        params = quantizer.params(w)
        packed = PackedLinear(quantize(w, params), params, layer.bias).to(layer.weight.device)
        replace_module(model, name, packed)
        reports.append(PackedLayerReport(name, str(quantizer.pattern), w.numel() * 4, packed.weight_bytes()))
    if not reports:
        raise ValueError("no quantized CompressedLinear layer to pack; run compress_ with a QuantConfig first")
    return PackReport(reports)
