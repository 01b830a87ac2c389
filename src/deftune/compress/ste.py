"""The straight-through estimator (Bengio et al. 2013), one mechanism for every quantizer and mask.

``ste(x, f) = x - sg(x) + sg(f(x))``: the forward value is ``f(x)`` exactly (``x - sg(x)`` is an
exact zero), and the backward is the identity, because ``sg`` (``detach``) blocks the gradient of
the other two terms. ``f`` may be anything — fake quantization, a sparsity mask, both in sequence.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor


def ste(x: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """``fn(x)`` in the forward pass, identity gradient in the backward pass."""
    with_no_grad = fn(x.detach()).detach()
    if with_no_grad.shape != x.shape:
        raise ValueError(f"the function changed the shape {tuple(x.shape)} -> {tuple(with_no_grad.shape)}")
    return x - x.detach() + with_no_grad.to(x.dtype)
