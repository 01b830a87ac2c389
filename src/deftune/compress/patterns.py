"""Compression patterns: small typed values parsed from short strings.

Quantization (one class, :class:`QuantPattern`)::

    int8                 8 bits, per output channel, symmetric (the defaults)
    int4:g128:asym       4 bits, groups of 128 along the input dim, scale + zero-point
    int3:tensor:mse      one scale for the whole tensor, clipping range searched for least MSE
    int4:ch1:p99.9       per input column, range clipped at the 99.9th percentile of |w|

Tokens after ``intB`` may come in any order: granularity ``tensor`` | ``ch`` (= ``ch0``, one scale per
row / output channel of a Linear weight) | ``ch1`` (one per column / input feature) | ``gN`` (groups of
N consecutive inputs of each row); ``sym`` | ``asym``; clipping ``mse`` | ``pXX`` (percentile).

Sparsity (one class per structure)::

    unstructured:0.5     the 50% smallest-magnitude weights are zeroed (exactly round(0.5 * numel))
    threshold:0.01       weights with |w| <= 0.01 are zeroed
    nm:2:4               N:M — in every group of 4 consecutive inputs, keep the 2 largest
    block:4x4:0.8        80% of the 4x4 blocks (smallest L1 norm) are zeroed
    channel:0.5          50% of the rows (output channels, smallest L2 norm) are zeroed
    channel:0.5:cols     ... of the columns (input features) instead

``str(pattern)`` gives back the canonical string, so patterns round-trip through the CLI and JSON.
Patterns are data only; :mod:`deftune.compress.quant` and :mod:`deftune.compress.sparsity` act on them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

Granularity = Literal["tensor", "channel", "group"]
ClipMethod = Literal["none", "percentile", "mse"]
GRANULARITIES: tuple[str, ...] = ("tensor", "channel", "group")
CLIP_METHODS: tuple[str, ...] = ("none", "percentile", "mse")
MIN_BITS, MAX_BITS = 2, 8


class PatternError(ValueError):
    """A pattern string or value that is not valid; the message names the accepted forms."""


# ---- quantization --------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantPattern:
    """How to quantize a tensor.

    Attributes:
        bits: bit width, 2..8.
        granularity: ``tensor`` (one scale), ``channel`` (one per slice along ``axis``) or ``group``
            (one per ``group_size`` consecutive elements of the last dim, in each row).
        axis: the channel axis (0: rows / output channels of a Linear weight; 1: columns).
        group_size: elements per group (``group`` granularity only).
        symmetric: ``True``: ``q = round(w / scale)`` in ``[-(2^(b-1)-1), 2^(b-1)-1]`` (zero stays zero);
            ``False``: ``q = round(w / scale) + zero_point`` in ``[0, 2^b - 1]``.
        clip: ``none`` (full range), ``percentile`` (range at the ``percentile`` of the values) or
            ``mse`` (range shrunk to the factor of least squared error, searched on a grid).
        percentile: in (0, 100], used by ``clip="percentile"``.
    """

    bits: int
    granularity: Granularity = "channel"
    axis: int = 0
    group_size: int = 0
    symmetric: bool = True
    clip: ClipMethod = "none"
    percentile: float = 100.0

    def __post_init__(self) -> None:
        if not (isinstance(self.bits, int) and MIN_BITS <= self.bits <= MAX_BITS):
            raise PatternError(f"bits must be an integer in {MIN_BITS}..{MAX_BITS}, got {self.bits!r}")
        if self.granularity not in GRANULARITIES:
            raise PatternError(f"granularity {self.granularity!r} is not one of {list(GRANULARITIES)}")
        if self.granularity == "group" and not (isinstance(self.group_size, int) and self.group_size >= 2):
            raise PatternError(f"group granularity needs group_size >= 2, got {self.group_size!r}")
        if self.granularity != "group" and self.group_size:
            raise PatternError(f"group_size={self.group_size} is only valid with granularity='group'")
        if self.granularity == "channel" and self.axis not in (0, 1):
            raise PatternError(f"channel axis must be 0 (rows) or 1 (columns), got {self.axis!r}")
        if self.clip not in CLIP_METHODS:
            raise PatternError(f"clip {self.clip!r} is not one of {list(CLIP_METHODS)}")
        if not (0.0 < self.percentile <= 100.0):
            raise PatternError(f"percentile must be in (0, 100], got {self.percentile!r}")
        if self.clip == "percentile" and self.percentile == 100.0:
            raise PatternError("clip='percentile' needs a percentile below 100 (e.g. 99.9)")
        if self.clip != "percentile" and self.percentile != 100.0:
            raise PatternError(f"percentile={self.percentile} is only used with clip='percentile', got clip={self.clip!r}")

    def check_shape(self, shape: Sequence[int]) -> None:
        """Raise :class:`PatternError` unless a tensor of ``shape`` can be quantized with this pattern."""
        if self.granularity == "channel" and self.axis >= len(shape):
            raise PatternError(f"channel axis {self.axis} needs a tensor of >= {self.axis + 1} dims, got shape "
                               f"{tuple(shape)}")
        if self.granularity == "group" and (len(shape) == 0 or shape[-1] % self.group_size):
            raise PatternError(
                f"group size {self.group_size} must divide the last dim of the tensor, shape {tuple(shape)}; "
                "choose a divisor or per-channel granularity"
            )

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1) - 1) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    def __str__(self) -> str:
        gran = {"tensor": "tensor", "channel": f"ch{self.axis}", "group": f"g{self.group_size}"}[self.granularity]
        parts = [f"int{self.bits}", gran, "sym" if self.symmetric else "asym"]
        if self.clip == "mse":
            parts.append("mse")
        elif self.clip == "percentile":
            parts.append(f"p{_fmt(self.percentile)}")
        return ":".join(parts)


def _fmt(x: float) -> str:
    """``x`` as short as it reads back exactly: ``0.5``, ``99.9``, or every digit of a computed level."""
    short = f"{x:g}"
    return short if float(short) == x else repr(float(x))


_QUANT_HELP = "int<bits>[:tensor|ch|ch0|ch1|g<N>][:sym|asym][:mse|p<percentile>], e.g. int4:g128:asym"


def parse_quant(text: str) -> QuantPattern:
    """Parse a quantization pattern string (see the module docstring)."""
    tokens = [t for t in text.strip().lower().split(":") if t]
    head = re.fullmatch(r"int(\d+)", tokens[0]) if tokens else None
    if head is None:
        raise PatternError(f"quantization pattern {text!r} must start with int<bits>; form: {_QUANT_HELP}")
    kw: dict = {"bits": int(head.group(1))}
    seen: dict[str, str] = {}  # kind of token -> the token that set it
    for tok in tokens[1:]:
        kind = ("granularity" if tok == "tensor" or re.fullmatch(r"ch[01]?|g\d+", tok)
                else "symmetry" if tok in ("sym", "asym") else None)
        if kind is not None and kind in seen:
            raise PatternError(f"{text!r} names two {kind} tokens ({seen[kind]!r} and {tok!r}); use one. "
                               f"Form: {_QUANT_HELP}")
        if kind is not None:
            seen[kind] = tok
        if tok == "tensor":
            kw.update(granularity="tensor")
        elif m := re.fullmatch(r"ch([01]?)", tok):
            kw.update(granularity="channel", axis=int(m.group(1) or 0))
        elif m := re.fullmatch(r"g(\d+)", tok):
            kw.update(granularity="group", group_size=int(m.group(1)))
        elif tok in ("sym", "asym"):
            kw.update(symmetric=tok == "sym")
        elif tok == "mse" or (m := re.fullmatch(r"p(\d+(?:\.\d*)?)", tok)):
            if "clip" in kw:
                raise PatternError(f"{text!r} names two clipping rules; use one of mse, p<percentile>")
            if tok == "mse":
                kw.update(clip="mse")
            else:
                kw.update(clip="percentile", percentile=float(m.group(1)))
        else:
            raise PatternError(f"unknown token {tok!r} in {text!r}; form: {_QUANT_HELP}")
    return QuantPattern(**kw)


# ---- sparsity ------------------------------------------------------------------------------------


def _check_fraction(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
        raise PatternError(f"{name} must be a fraction in [0, 1), got {value!r}")


@dataclass(frozen=True)
class Unstructured:
    """Zero the ``round(sparsity * numel)`` smallest-magnitude entries."""

    sparsity: float

    def __post_init__(self) -> None:
        _check_fraction("sparsity", self.sparsity)

    def check_shape(self, shape: Sequence[int]) -> None:
        """Any shape."""

    def __str__(self) -> str:
        return f"unstructured:{_fmt(self.sparsity)}"


@dataclass(frozen=True)
class Threshold:
    """Zero every entry with ``|w| <= threshold``."""

    threshold: float

    def __post_init__(self) -> None:
        if not (isinstance(self.threshold, (int, float)) and self.threshold >= 0):
            raise PatternError(f"threshold must be >= 0, got {self.threshold!r}")

    def check_shape(self, shape: Sequence[int]) -> None:
        """Any shape."""

    def __str__(self) -> str:
        return f"threshold:{_fmt(self.threshold)}"


@dataclass(frozen=True)
class NM:
    """N:M sparsity: in each run of ``m`` consecutive entries of the last dim keep the ``n`` largest."""

    n: int
    m: int

    def __post_init__(self) -> None:
        if not (isinstance(self.n, int) and isinstance(self.m, int) and 0 < self.n < self.m):
            raise PatternError(f"N:M needs integers 0 < n < m, got n={self.n!r}, m={self.m!r}")

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m

    def check_shape(self, shape: Sequence[int]) -> None:
        """The last dim must be a multiple of ``m``."""
        if len(shape) == 0 or shape[-1] % self.m:
            raise PatternError(f"{self}: the last dim of shape {tuple(shape)} must be a multiple of m={self.m}")

    def __str__(self) -> str:
        return f"nm:{self.n}:{self.m}"


@dataclass(frozen=True)
class Block:
    """Zero the ``round(sparsity * n_blocks)`` ``rows x cols`` blocks of least L1 norm (2-D weights)."""

    rows: int
    cols: int
    sparsity: float

    def __post_init__(self) -> None:
        if not (isinstance(self.rows, int) and isinstance(self.cols, int) and self.rows >= 1 and self.cols >= 1):
            raise PatternError(f"block shape must be positive integers, got {self.rows!r}x{self.cols!r}")
        _check_fraction("sparsity", self.sparsity)

    def check_shape(self, shape: Sequence[int]) -> None:
        """A 2-D weight that divides into ``rows x cols`` blocks."""
        if len(shape) != 2:
            raise PatternError(f"{self}: block sparsity needs a 2-D weight, got shape {tuple(shape)}")
        if shape[0] % self.rows or shape[1] % self.cols:
            raise PatternError(f"{self}: shape {tuple(shape)} is not divisible into {self.rows}x{self.cols} blocks")

    def __str__(self) -> str:
        return f"block:{self.rows}x{self.cols}:{_fmt(self.sparsity)}"


@dataclass(frozen=True)
class Channel:
    """Zero whole rows (``axis=0``, output channels) or columns (``axis=1``) of least L2 norm."""

    sparsity: float
    axis: int = 0

    def __post_init__(self) -> None:
        _check_fraction("sparsity", self.sparsity)
        if self.axis not in (0, 1):
            raise PatternError(f"channel axis must be 0 (rows) or 1 (cols), got {self.axis!r}")

    def check_shape(self, shape: Sequence[int]) -> None:
        """A weight of at least 2 dims."""
        if len(shape) < 2:
            raise PatternError(f"{self}: channel sparsity needs a weight of >= 2 dims, got shape {tuple(shape)}")

    def __str__(self) -> str:
        return f"channel:{_fmt(self.sparsity)}" + (":cols" if self.axis == 1 else "")


SparsityPattern = Unstructured | Threshold | NM | Block | Channel
Pattern = QuantPattern | SparsityPattern
FRACTIONAL = (Unstructured, Block, Channel)  # patterns whose sparsity a layer allocation may set


def with_sparsity(pattern: SparsityPattern, sparsity: float) -> SparsityPattern:
    """The same structure at another sparsity (patterns with a fixed level raise)."""
    if not isinstance(pattern, FRACTIONAL):
        raise PatternError(f"pattern {pattern} has no adjustable sparsity level")
    return replace(pattern, sparsity=float(sparsity))


def _num(text: str, what: str, full: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise PatternError(f"{what} {text!r} in {full!r} is not a number") from None


def _parse_unstructured(args: list[str], full: str) -> Unstructured:
    if len(args) != 1:
        raise PatternError(f"{full!r}: expected unstructured:<sparsity>")
    return Unstructured(_num(args[0], "sparsity", full))


def _parse_threshold(args: list[str], full: str) -> Threshold:
    if len(args) != 1:
        raise PatternError(f"{full!r}: expected threshold:<value>")
    return Threshold(_num(args[0], "threshold", full))


def _parse_nm(args: list[str], full: str) -> NM:
    if len(args) != 2 or not all(a.isdigit() for a in args):
        raise PatternError(f"{full!r}: expected nm:<n>:<m>, e.g. nm:2:4")
    return NM(int(args[0]), int(args[1]))


def _parse_block(args: list[str], full: str) -> Block:
    shape = re.fullmatch(r"(\d+)x(\d+)", args[0]) if args else None
    if len(args) != 2 or shape is None:
        raise PatternError(f"{full!r}: expected block:<rows>x<cols>:<sparsity>, e.g. block:4x4:0.8")
    return Block(int(shape.group(1)), int(shape.group(2)), _num(args[1], "sparsity", full))


def _parse_channel(args: list[str], full: str) -> Channel:
    axes = {"rows": 0, "cols": 1}
    if len(args) not in (1, 2) or (len(args) == 2 and args[1] not in axes):
        raise PatternError(f"{full!r}: expected channel:<sparsity>[:rows|cols]")
    return Channel(_num(args[0], "sparsity", full), axes[args[1]] if len(args) == 2 else 0)


SPARSITY_PARSERS: dict[str, Callable[[list[str], str], SparsityPattern]] = {
    "unstructured": _parse_unstructured,
    "threshold": _parse_threshold,
    "nm": _parse_nm,
    "block": _parse_block,
    "channel": _parse_channel,
}


def parse_sparsity(text: str) -> SparsityPattern:
    """Parse a sparsity pattern string (see the module docstring)."""
    head, *args = text.strip().lower().split(":")
    if head not in SPARSITY_PARSERS:
        raise PatternError(
            f"unknown sparsity pattern {head!r} in {text!r}; choose one of {sorted(SPARSITY_PARSERS)}"
        )
    return SPARSITY_PARSERS[head](args, text)


def parse_pattern(text: str | Pattern) -> Pattern:
    """A quantization or sparsity pattern from its string (patterns pass through unchanged)."""
    if isinstance(text, (QuantPattern, *SparsityPattern.__args__)):
        return text
    if not isinstance(text, str):
        raise PatternError(f"expected a pattern string, got {type(text).__name__}")
    if text.strip().lower().startswith("int"):
        return parse_quant(text)
    return parse_sparsity(text)
