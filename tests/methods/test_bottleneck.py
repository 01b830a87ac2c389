"""BottleneckLayer against hand-computed outputs; merge / unmerge of linear adapters."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from deftune.methods import MergeNotSupportedError
from deftune.methods.bottleneck import BottleneckConfig, BottleneckLayer


def _set(layer: BottleneckLayer, down_w, down_b, up_w, up_b) -> None:
    with torch.no_grad():
        layer.adapter_down.weight.copy_(torch.tensor(down_w))
        layer.adapter_down.bias.copy_(torch.tensor(down_b))
        layer.adapter_up.weight.copy_(torch.tensor(up_w))
        layer.adapter_up.bias.copy_(torch.tensor(up_b))


def _identity_linear(bias: bool = True) -> nn.Linear:
    base = nn.Linear(2, 2, bias=bias)
    with torch.no_grad():
        base.weight.copy_(torch.eye(2))
        if bias:
            base.bias.zero_()
    return base


def test_starts_as_the_wrapped_projection():
    base = nn.Linear(8, 4)
    layer = BottleneckLayer(base, BottleneckConfig(reduction_factor=2))
    x = torch.randn(3, 5, 8)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)
    assert layer.adapter_down.out_features == 2 and layer.adapter_down.in_features == 4


def test_sequential_relu_by_hand():
    # y = x (identity base); down = [1, -1] (2 -> 1), up = [[2], [3]], biases 0; relu
    layer = BottleneckLayer(_identity_linear(), BottleneckConfig(reduction_factor=2, scaling=0.5))
    _set(layer, [[1.0, -1.0]], [0.0], [[2.0], [3.0]], [0.0, 0.0])
    x = torch.tensor([[3.0, 1.0], [1.0, 3.0]])
    # row 1: h = relu(3 - 1) = 2 -> y + 0.5 * [4, 6] = [5, 4];  row 2: h = relu(-2) = 0 -> y
    torch.testing.assert_close(layer(x), torch.tensor([[5.0, 4.0], [1.0, 3.0]]))


def test_parallel_reads_the_projection_input():
    base = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        base.weight.zero_()  # y = 0: the output is the adapter alone
    layer = BottleneckLayer(
        base, BottleneckConfig(reduction_factor=2, placement="parallel", activation="identity")
    )
    _set(layer, [[1.0, 1.0, 1.0, 1.0]], [1.0], [[1.0], [-1.0]], [0.5, 0.0])
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])  # h = 10 + 1 = 11
    torch.testing.assert_close(layer(x), torch.tensor([[11.5, -11.0]]))


@pytest.mark.parametrize("placement", ["sequential", "parallel"])
@pytest.mark.parametrize("base_kind", ["linear", "linear-nobias", "conv1d"])
@pytest.mark.parametrize("scaling", [1.0, 0.5])
def test_linear_adapter_merges_and_unmerges(placement, base_kind, scaling):
    torch.manual_seed(0)
    base = {"linear": nn.Linear(6, 8), "linear-nobias": nn.Linear(6, 8, bias=False), "conv1d": Conv1D(8, 6)}[
        base_kind
    ]
    if base_kind == "conv1d":
        nn.init.normal_(base.weight, std=0.3)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    layer = BottleneckLayer(
        base, BottleneckConfig(reduction_factor=2, placement=placement, activation="identity", scaling=scaling)
    )
    with torch.no_grad():
        layer.adapter_up.weight.normal_(std=0.3)
        layer.adapter_up.bias.normal_(std=0.3)
    x = torch.randn(4, 3, 6)
    expected = layer(x)
    layer.merge()
    assert layer.merged and not torch.equal(base.weight, original["weight"])
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(base(x), expected, rtol=0, atol=1e-5)  # the projection alone now
    layer.unmerge()
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-5)
    assert set(base.state_dict()) == set(original)  # an added bias is removed again
    for key, value in original.items():
        torch.testing.assert_close(base.state_dict()[key], value, rtol=0, atol=1e-5)


def test_nonlinear_adapter_refuses_to_merge():
    layer = BottleneckLayer(nn.Linear(4, 4), BottleneckConfig(activation="gelu", reduction_factor=2))
    with pytest.raises(MergeNotSupportedError, match="activation 'gelu' is non-linear"):
        layer.merge()


def test_rejects_unsupported_modules_and_bad_config():
    with pytest.raises(TypeError, match="nn.Linear or transformers Conv1D"):
        BottleneckLayer(nn.Conv2d(2, 2, 1), BottleneckConfig())
    with pytest.raises(ValueError, match="placement must be one of"):
        BottleneckConfig(placement="beside")


def test_an_unsupported_target_leaves_the_model_unchanged():
    """Every target is checked before the first adapter goes in or anything is frozen."""
    from methods_tiny import tiny_bert

    from deftune.methods import MethodConfig, apply_method
    from deftune.methods.bottleneck import adapter_layers

    model = tiny_bert()
    with pytest.raises(TypeError, match="got LayerNorm"):
        apply_method(model, MethodConfig("adapter", target_modules=("output.dense", "output.LayerNorm")))
    assert not adapter_layers(model)
    assert all(p.requires_grad for p in model.parameters())


def test_merging_twice_folds_the_adapter_in_once():
    torch.manual_seed(0)
    layer = BottleneckLayer(nn.Linear(6, 8), BottleneckConfig(reduction_factor=2, activation="identity"))
    with torch.no_grad():
        layer.adapter_up.weight.normal_(std=0.3)
        layer.adapter_up.bias.normal_(std=0.3)
    x = torch.randn(4, 6)
    expected = layer(x)
    layer.merge()
    layer.merge()
    torch.testing.assert_close(layer.base_layer(x), expected, rtol=0, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-5)
