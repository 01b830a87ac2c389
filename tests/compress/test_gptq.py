import pytest
import torch

from deftune.compress import GPTQOptions, choose_qparams, fake_quantize, gptq_quantize, parse_quant


def _data(seed=0, out=48, cols=128, n=2048):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, cols, generator=g)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5
    scales = torch.logspace(0, -2, cols)  # correlated inputs of very unequal energy, as in real models
    x = (torch.randn(n, cols, generator=g) * scales) @ mix + 0.1 * torch.randn(n, cols, generator=g)
    return w, x, 2.0 * x.T @ x / n


def _out_err(w, wq, x):
    return ((x @ (w - wq).T).norm() / (x @ w.T).norm()).item()


@pytest.mark.parametrize("text", ["int4:ch", "int3:g32", "int4:g64:asym", "int2:ch:asym", "int3:ch1", "int4:tensor"])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_round_to_nearest(text, act_order):
    w, x, h = _data()
    p = parse_quant(text)
    q, params = gptq_quantize(w, h, p, GPTQOptions(act_order=act_order, block_size=32))
    rtn = fake_quantize(w, p)
    assert _out_err(w, q, x) < 0.9 * _out_err(w, rtn, x)
    assert torch.equal(fake_quantize(q, params), q)  # on the grid of the returned parameters
    assert params.scale.shape == choose_qparams(w, p).scale.shape  # one scale per group, as RTN


@pytest.mark.parametrize("text", ["int4:ch", "int3:g32"])
def test_lazy_blocks_change_nothing(text):
    """Lazy block updates are an implementation detail (the paper's Step 2): one column per block
    and one block for everything give the same weights, so the error feedback inside a block and
    across blocks must both be right."""
    w, _, h = _data(cols=64)
    p = parse_quant(text)
    one, _ = gptq_quantize(w, h, p, GPTQOptions(block_size=1))
    whole, _ = gptq_quantize(w, h, p, GPTQOptions(block_size=64))
    mid, _ = gptq_quantize(w, h, p, GPTQOptions(block_size=32))
    assert (one - whole).abs().max() < 1e-4 and (mid - whole).abs().max() < 1e-4


def test_gptq_with_identity_hessian_and_no_damp_is_round_to_nearest():
    w = torch.randn(8, 16)
    q, _ = gptq_quantize(w, torch.eye(16), parse_quant("int4:ch"), GPTQOptions(damp=0.0))
    assert torch.allclose(q, fake_quantize(w, "int4:ch"))


def test_gptq_shape_checks():
    with pytest.raises(ValueError, match="Hessian shape"):
        gptq_quantize(torch.randn(4, 8), torch.eye(4), parse_quant("int4"))


def test_gptq_does_not_depend_on_the_hessians_scale():
    """Damping is relative to mean(diag H): H and 1e-4 H give the same weights (an absolute damping
    would swamp the small one)."""
    w, _, h = _data(cols=32)
    p = parse_quant("int4:ch")
    a, _ = gptq_quantize(w, h, p)
    b, _ = gptq_quantize(w, 1e-4 * h, p)
    assert (a - b).abs().max() < 1e-4


def test_a_dead_input_needs_no_damping():
    """An input that is zero on all calibration data makes H singular; GPTQ still runs at damp 0."""
    w, x, _ = _data(cols=16, n=256)
    x[:, 3] = 0.0
    h = 2.0 * x.T @ x / x.shape[0]
    q, params = gptq_quantize(w, h, parse_quant("int4:ch"), GPTQOptions(damp=0.0))
    assert torch.isfinite(q).all() and torch.equal(fake_quantize(q, params), q)


def test_act_order_starts_with_the_largest_hessian_diagonal():
    """With per-row scales fixed from the original weights, the first column quantized gets no error
    feedback (it is round-to-nearest); under act-order that is the column of largest diag(H)."""
    w, _, h = _data(cols=32)
    h = h * torch.linspace(0.5, 2.0, 32).outer(torch.linspace(0.5, 2.0, 32))  # largest diagonal last
    p = parse_quant("int4:ch")
    q, _ = gptq_quantize(w, h, p, GPTQOptions(act_order=True))
    rtn = fake_quantize(w, p)
    first, last = int(torch.diag(h).argmax()), int(torch.diag(h).argmin())
    assert torch.equal(q[:, first], rtn[:, first])
    assert not torch.equal(q[:, last], rtn[:, last])


def test_per_column_scales_follow_the_updated_weights():
    """int3:ch1: each column's scale is chosen when GPTQ reaches it, from the weights the earlier
    columns' errors have moved: the first column's is round-to-nearest's, later ones differ."""
    w, _, h = _data(cols=32)
    _, params = gptq_quantize(w, h, parse_quant("int3:ch1"))
    static = choose_qparams(w, "int3:ch1").scale.flatten()
    got = params.scale.flatten()
    assert got[0] == static[0]
    assert (got[1:] != static[1:]).sum() > 16


@pytest.mark.parametrize("kw, needle", [({"damp": 1.5}, "damp must be in"), ({"damp": -0.1}, "damp must be in"),
                                        ({"block_size": 0}, "block_size must be >= 1")])
def test_gptq_options_are_validated(kw, needle):
    with pytest.raises(ValueError, match=needle):
        GPTQOptions(**kw)
