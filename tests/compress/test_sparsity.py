import pytest
import torch

from deftune.compress import (
    NM,
    Block,
    Channel,
    Unstructured,
    allocate,
    compute_mask,
    erk_densities,
    sparsity_of,
)
from deftune.compress.patterns import PatternError


def test_block_mask_by_hand():
    w = torch.tensor(
        [
            [1.0, 1.0, 9.0, 9.0],
            [1.0, 1.0, 9.0, 9.0],
            [5.0, 5.0, 0.1, 0.1],
            [5.0, 5.0, 0.1, 0.1],
        ]
    )
    keep = compute_mask(w, Block(2, 2, 0.5))
    expected = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(keep, expected)
    assert torch.equal(compute_mask(-w, Block(2, 2, 0.5)), expected)  # magnitudes: the sign does not count
    # blocks rank by their L1 norm: |1|+|1| = 2 beats |0|+|1.5| = 1.5 (by the L2 norm, 2 < 2.25, it would not)
    row = compute_mask(torch.tensor([[1.0, 1.0, 0.0, 1.5]]), Block(1, 2, 0.5))
    assert torch.equal(row, torch.tensor([[True, True, False, False]]))


def test_nm_mask_by_hand():
    w = torch.tensor([[0.1, -0.9, 0.5, 0.2, 3.0, -2.0, 1.0, 0.0]])
    keep = compute_mask(w, NM(2, 4))
    assert keep.tolist() == [[False, True, True, False, True, True, False, False]]


def test_channel_and_threshold_by_hand():
    w = torch.tensor([[3.0, 4.0], [0.1, 0.1], [2.0, 0.0]])
    assert compute_mask(w, Channel(1 / 3)).tolist() == [[True, True], [False, False], [True, True]]
    # column L2 norms: sqrt(9 + 0.01 + 4) = 3.61 < sqrt(16 + 0.01 + 0) = 4.0, so column 0 goes
    # (its L1 norm, 5.1, is the larger: an L1 channel norm would drop column 1)
    assert compute_mask(w, Channel(0.5, axis=1)).tolist() == [[False, True]] * 3
    assert compute_mask(w, "threshold:0.5").tolist() == [[True, True], [False, False], [True, False]]


@pytest.mark.parametrize("shape", [(7, 13), (64, 96), (1000,)])
@pytest.mark.parametrize("s", [0.1, 0.5, 0.9, 0.0])
def test_unstructured_exact_fraction(shape, s):
    w = torch.randn(shape)
    keep = compute_mask(w, Unstructured(s))
    n = w.numel()
    assert int((~keep).sum()) == round(s * n)
    # pruned entries are never larger than kept ones
    if 0 < s:
        assert w.abs()[~keep].max() <= w.abs()[keep].min()


def test_unstructured_exact_with_ties():
    w = torch.ones(10, 10)
    mask = compute_mask(w, "unstructured:0.37")
    assert int((~mask).sum()) == 37
    # among equal magnitudes the earlier positions go first: the same mask on every call and device
    assert not mask.reshape(-1)[:37].any() and mask.reshape(-1)[37:].all()


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (1, 2)])
def test_nm_validity(n, m):
    w = torch.randn(32, 64)
    keep = compute_mask(w, NM(n, m))
    groups = keep.reshape(-1, m)
    assert torch.all(groups.sum(dim=1) == n)
    mags = w.abs().reshape(-1, m)
    kept_min = torch.where(groups, mags, torch.inf).amin(dim=1)
    pruned_max = torch.where(~groups, mags, -torch.inf).amax(dim=1)
    assert torch.all(kept_min >= pruned_max)
    assert sparsity_of(keep) == pytest.approx(1 - n / m)


def test_nm_needs_divisible_dim():
    with pytest.raises(PatternError, match="multiple of m=4"):
        compute_mask(torch.randn(4, 6), "nm:2:4")


def test_block_exact_fraction():
    keep = compute_mask(torch.randn(32, 64), "block:4x8:0.75")
    assert sparsity_of(keep) == pytest.approx(0.75)


def _layers():
    torch.manual_seed(0)
    return {"small": torch.randn(16, 16), "wide": torch.randn(64, 256), "big": torch.randn(256, 256) * 0.1}


def test_uniform_and_global_allocation_hit_the_total():
    layers = _layers()
    total = sum(w.numel() for w in layers.values())
    for alloc in ("uniform", "global"):
        plan = allocate(layers, "unstructured:0.6", alloc)
        pruned = sum(int((~compute_mask(w, plan[n])).sum()) for n, w in layers.items())
        assert abs(pruned - 0.6 * total) <= len(layers)
    plan = allocate(layers, "unstructured:0.6", "global")
    assert plan["big"].sparsity > plan["wide"].sparsity  # the small-magnitude layer loses more


def test_erk_allocation():
    shapes = {"a": (16, 16), "b": (64, 256), "c": (512, 512)}
    dens = erk_densities(shapes, 0.9)
    total = sum(a * b for a, b in shapes.values())
    kept = sum(dens[k] * a * b for k, (a, b) in shapes.items())
    assert kept == pytest.approx(0.1 * total)
    assert dens["a"] > dens["b"] > dens["c"]  # denser where fan-in + fan-out is large per weight
    assert all(0 < d <= 1 for d in dens.values())
    plan = allocate({k: torch.randn(s) for k, s in shapes.items()}, "unstructured:0.9", "erk")
    assert plan["c"].sparsity > 0.9 > plan["a"].sparsity


def test_allocation_errors():
    with pytest.raises(ValueError, match="allocation"):
        allocate(_layers(), "unstructured:0.5", "random")
    with pytest.raises(ValueError, match="fraction-based"):
        allocate(_layers(), "nm:2:4", "erk")


def test_global_allocation_hands_tied_weights_out_in_layer_order():
    """Every magnitude equal: the shared threshold ties all 40 weights, and the 10 to prune go to the
    first layer before the second (a deterministic order, not a split by size or a random one)."""
    layers = {"a": torch.ones(4, 5), "b": torch.ones(4, 5)}
    plan = allocate(layers, "unstructured:0.25", "global")
    assert plan["a"].sparsity == pytest.approx(0.5) and plan["b"].sparsity == 0.0
    mixed = {"a": torch.full((2, 5), 2.0), "b": torch.tensor([[1.0] * 5 + [2.0] * 5])}
    plan = allocate(mixed, "unstructured:0.4", "global")  # 8 to prune: b's five 1.0s, then 3 tied 2.0s
    assert plan["a"].sparsity == pytest.approx(0.3) and plan["b"].sparsity == pytest.approx(0.5)
