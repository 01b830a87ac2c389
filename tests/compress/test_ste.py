import torch

from deftune.compress import compute_mask, fake_quantize, ste


def test_forward_equals_hard_operation_and_backward_is_identity():
    torch.manual_seed(0)
    for fn in (
        lambda w: fake_quantize(w, "int4:g8:asym"),
        lambda w: w * compute_mask(w, "nm:2:4"),
        lambda w: fake_quantize(w * compute_mask(w, "unstructured:0.5"), "int3:ch"),
    ):
        x = torch.randn(6, 16, requires_grad=True)
        y = ste(x, fn)
        assert torch.equal(y, fn(x.detach()))  # exactly the hard value
        upstream = torch.randn(6, 16)
        (y * upstream).sum().backward()
        assert torch.equal(x.grad, upstream)  # identity backward


def test_without_ste_rounding_has_no_gradient():
    x = torch.randn(4, 8, requires_grad=True)
    # the hard operation alone gives no gradient to train through: that is what the STE is for
    assert not fake_quantize(x, "int4:ch").requires_grad
    assert ste(x, lambda w: fake_quantize(w, "int4:ch")).requires_grad
