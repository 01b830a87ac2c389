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
