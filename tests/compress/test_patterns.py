import re

import pytest

from deftune.compress.patterns import (
    NM,
    Block,
    Channel,
    PatternError,
    QuantPattern,
    Threshold,
    Unstructured,
    parse_pattern,
    with_sparsity,
)

CASES = [
    ("int4:g128:asym", QuantPattern(4, "group", group_size=128, symmetric=False)),
    ("int8", QuantPattern(8)),
    ("int8:ch", QuantPattern(8, "channel", axis=0)),
    ("int3:tensor:mse", QuantPattern(3, "tensor", clip="mse")),
    ("int4:ch1:p99.9", QuantPattern(4, "channel", axis=1, clip="percentile", percentile=99.9)),
    ("unstructured:0.5", Unstructured(0.5)),
    ("threshold:0.01", Threshold(0.01)),
    ("nm:2:4", NM(2, 4)),
    ("block:4x4:0.8", Block(4, 4, 0.8)),
    ("channel:0.5", Channel(0.5)),
    ("channel:0.25:cols", Channel(0.25, axis=1)),
]


@pytest.mark.parametrize("text,expected", CASES)
def test_parse_and_round_trip(text, expected):
    p = parse_pattern(text)
    assert p == expected
    assert parse_pattern(str(p)) == p  # canonical string parses back to the same value


@pytest.mark.parametrize("bad, says", [
    ("int9", "bits must be an integer in 2..8, got 9"), ("int1", "in 2..8, got 1"),
    ("int4:g0", "group_size >= 2, got 0"), ("int4:g1", "group_size >= 2, got 1"),
    ("int4:foo", "unknown token 'foo' in 'int4:foo'; form: int<bits>"), ("int4:p100x", "unknown token 'p100x'"),
    ("nm:4:2", "0 < n < m, got n=4, m=2"), ("nm:2", "expected nm:<n>:<m>, e.g. nm:2:4"),
    ("block:4x:0.5", "expected block:<rows>x<cols>:<sparsity>"), ("block:4x4:1.5", "in [0, 1), got 1.5"),
    ("unstructured:1.0", "in [0, 1), got 1.0"), ("channel:0.5:diag", "expected channel:<sparsity>[:rows|cols]"),
    ("sparse:0.5", "unknown sparsity pattern 'sparse' in 'sparse:0.5'; choose one of ['block', 'channel'"),
    ("int4:p99.9:mse", "'int4:p99.9:mse' names two clipping rules; use one of mse, p<percentile>"),
])
def test_bad_strings_raise_with_forms(bad, says):
    """Each bad string is refused with the offending value and the accepted form."""
    with pytest.raises(PatternError, match=re.escape(says)):
        parse_pattern(bad)


def test_percentile_belongs_to_percentile_clipping():
    """A percentile the pattern would not use is refused: it would be lost by ``str`` (no round trip)."""
    with pytest.raises(PatternError, match="percentile=99.0 is only used with clip='percentile', got clip='mse'"):
        QuantPattern(4, clip="mse", percentile=99.0)


def test_quant_ranges():
    assert (QuantPattern(4).qmin, QuantPattern(4).qmax) == (-7, 7)
    assert (QuantPattern(4, symmetric=False).qmin, QuantPattern(4, symmetric=False).qmax) == (0, 15)
    assert QuantPattern(8).qmax == 127


def test_with_sparsity():
    assert with_sparsity(Block(2, 2, 0.5), 0.75) == Block(2, 2, 0.75)
    with pytest.raises(PatternError):
        with_sparsity(NM(2, 4), 0.3)


def test_defaults_are_symmetric_per_output_channel():
    p = parse_pattern("int8")
    assert (p.granularity, p.axis, p.symmetric, p.clip) == ("channel", 0, True, "none")
    assert str(p) == "int8:ch0:sym"


@pytest.mark.parametrize("bad, says", [
    ("int4:p100", "needs a percentile below 100"),
    ("int4:c0", "unknown token 'c0'"),
    ("nm:2:4:junk", "expected nm:<n>:<m>"),
    ("nm:0:4", "0 < n < m, got n=0, m=4"),
    ("int4:sym:asym", "two symmetry tokens ('sym' and 'asym')"),
    ("int4:ch1:g128", "two granularity tokens ('ch1' and 'g128')"),
    ("int4:tensor:g64", "two granularity tokens"),
])
def test_more_bad_strings(bad, says):
    with pytest.raises(PatternError, match=re.escape(says)):
        parse_pattern(bad)


def test_values_at_the_edges_of_their_ranges():
    assert parse_pattern("threshold:0") == Threshold(0.0)  # zero only the exact zeros: allowed
    with pytest.raises(PatternError, match="group_size=8 is only valid with granularity='group'"):
        QuantPattern(4, "channel", group_size=8)
    with pytest.raises(PatternError, match=r"shape \(6, 8\) is not divisible into 4x4 blocks"):
        Block(4, 4, 0.5).check_shape((6, 8))
    with pytest.raises(PatternError, match=r"shape \(8, 6\) is not divisible into 4x4 blocks"):
        Block(4, 4, 0.5).check_shape((8, 6))


def test_relative_error_of_a_zero_reference():
    import math

    import torch

    from deftune.compress import relative_error

    assert relative_error(torch.zeros(3), torch.ones(3)) == math.inf
    assert relative_error(torch.zeros(3), torch.zeros(3)) == 0.0


def test_computed_levels_read_back_exactly():
    from deftune.compress.patterns import with_sparsity

    for level in (0.5, 0.3, 0.12345678, 1 / 3, 0.999999):
        for pattern in (Unstructured(level), Block(4, 4, level)):
            assert parse_pattern(str(with_sparsity(pattern, level))) == with_sparsity(pattern, level)
    assert str(Unstructured(0.5)) == "unstructured:0.5" and str(parse_pattern("int4:p99.9")) == "int4:ch0:sym:p99.9"
