"""CPU tests of the reference sparse-MLP operator and of the CPU dispatch (run in CI)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from deftune.sparse import (
    GatedMLPWeights,
    MLPWeights,
    SparseMLPConfig,
    gated_mlp_reference,
    mlp_reference,
    sparse_down_proj,
    sparse_gated_mlp,
    sparse_mlp,
    threshold_activation,
)
from deftune.sparse.reference import ACTIVATIONS

torch.set_num_threads(1)


def _gated(hidden: int, inter: int, bias: bool = False, dtype=torch.float64) -> GatedMLPWeights:
    def b(n):
        return torch.randn(n, dtype=dtype) if bias else None

    return GatedMLPWeights(
        torch.randn(inter, hidden, dtype=dtype) / hidden**0.5,
        torch.randn(inter, hidden, dtype=dtype) / hidden**0.5,
        torch.randn(inter, hidden, dtype=dtype) / inter**0.5,
        b(inter),
        b(inter),
        b(hidden),
    )


def _masked_dense_gated(x, w: GatedMLPWeights, t: float, act) -> torch.Tensor:
    """Loop-free dense computation with an explicit 0/1 mask, written independently of the operator."""
    g = x @ w.w_gate.T + (0 if w.b_gate is None else w.b_gate)
    a = act(g)
    keep = (a.abs() > t).to(a.dtype)
    u = x @ w.w_up.T + (0 if w.b_up is None else w.b_up)
    return (a * keep * u) @ w.w_down_t + (0 if w.b_down is None else w.b_down)


def test_hand_checked_gated_relu():
    # H=2, I=3. gate rows pick x0, x1, x0+x1; up = 1 everywhere; down_t rows are unit-ish vectors.
    w = GatedMLPWeights(
        w_gate=torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]),
        w_up=torch.ones(3, 2),
        w_down_t=torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]),
    )
    x = torch.tensor([[2.0, -1.0]])
    # gate = [2, -1, 1]; relu -> [2, 0, 1]; up = x0 + x1 = 1 for every neuron.
    # t = 0:   h = [2, 0, 1] -> y = 2*[1,0] + 1*[1,1] = [3, 1]
    # t = 1.5: h = [2, 0, 0] -> y = [2, 0]
    assert torch.equal(gated_mlp_reference(x, w, 0.0, "relu"), torch.tensor([[3.0, 1.0]]))
    assert torch.equal(gated_mlp_reference(x, w, 1.5, "relu"), torch.tensor([[2.0, 0.0]]))
    # Exactly at the threshold is dropped (|a| <= t -> 0): t = 1 drops the neuron with a = 1.
    assert torch.equal(gated_mlp_reference(x, w, 1.0, "relu"), torch.tensor([[2.0, 0.0]]))


def test_hand_checked_nongated_with_bias():
    w = MLPWeights(
        w_up=torch.tensor([[1.0, 0.0], [0.0, 1.0]]),
        w_down_t=torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
        b_up=torch.tensor([0.0, -0.5]),
        b_down=torch.tensor([10.0, 20.0]),
    )
    x = torch.tensor([[1.0, 1.0]])
    # up = [1, 0.5]; identity act; t = 0.6 keeps only the first -> [1, 2] + b_down.
    assert torch.equal(mlp_reference(x, w, 0.6, "identity"), torch.tensor([[11.0, 22.0]]))
    assert torch.equal(mlp_reference(x, w, 0.0, "identity"), torch.tensor([[12.5, 24.0]]))


@pytest.mark.parametrize("shape", [(1, 1, 1023), (2, 3, 64), (5, 17)])
@pytest.mark.parametrize("inter", [1, 37, 1023])
@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh", "relu"])
def test_gated_equals_masked_dense(shape, inter, act):
    hidden = shape[-1]
    w = _gated(hidden, inter, bias=inter == 37)
    x = torch.randn(*shape, dtype=torch.float64)
    fn = ACTIVATIONS[act]
    a = fn(x @ w.w_gate.T + (0 if w.b_gate is None else w.b_gate))
    t = float(a.abs().flatten().quantile(0.6))
    y = gated_mlp_reference(x, w, t, act)
    assert y.shape == x.shape
    torch.testing.assert_close(y, _masked_dense_gated(x, w, t, fn), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(1, 1, 1023), (3, 40)])
def test_nongated_equals_masked_dense(shape):
    hidden, inter = shape[-1], 77
    w = MLPWeights(
        torch.randn(inter, hidden, dtype=torch.float64),
        torch.randn(inter, hidden, dtype=torch.float64),
        torch.randn(inter, dtype=torch.float64),
        torch.randn(hidden, dtype=torch.float64),
    )
    x = torch.randn(*shape, dtype=torch.float64)
    a = F.gelu(x @ w.w_up.T + w.b_up)
    t = float(a.abs().flatten().quantile(0.8))
    expected = (a * (a.abs() > t)) @ w.w_down_t + w.b_down
    torch.testing.assert_close(mlp_reference(x, w, t, "gelu"), expected, rtol=1e-12, atol=1e-12)


def test_threshold_zero_is_the_dense_mlp():
    w = _gated(48, 96)
    x = torch.randn(4, 48, dtype=torch.float64)
    dense = (F.silu(x @ w.w_gate.T) * (x @ w.w_up.T)) @ w.w_down_t
    torch.testing.assert_close(gated_mlp_reference(x, w, 0.0), dense, rtol=1e-12, atol=1e-12)


def test_down_proj_skipping_zero_rows_equals_gather():
    a = torch.randn(3, 50, dtype=torch.float64)
    a = threshold_activation(a, 1.0)
    w_t = torch.randn(50, 20, dtype=torch.float64)
    active = (a != 0).any(0).nonzero().flatten()
    expected = a[:, active] @ w_t[active]
    torch.testing.assert_close(sparse_down_proj(a, w_t), expected, rtol=1e-12, atol=1e-12)


def test_threshold_activation_density_is_monotone():
    a = torch.randn(1000, dtype=torch.float64)
    counts = [int((threshold_activation(a, t) != 0).sum()) for t in (0.0, 0.5, 1.0, 2.0)]
    assert counts == sorted(counts, reverse=True) and counts[0] == 1000 and counts[-1] < 100


def test_cpu_dispatch_runs_the_reference_and_fills_out():
    w = _gated(33, 65, dtype=torch.float32)
    x = torch.randn(2, 33)
    out = torch.full_like(x, float("nan"))
    y = sparse_gated_mlp(x, w, 0.1, "silu", out=out)
    assert y is out
    torch.testing.assert_close(out, gated_mlp_reference(x, w, 0.1, "silu"))
    nw = MLPWeights(w.w_up, w.w_down_t)
    torch.testing.assert_close(sparse_mlp(x, nw, 0.1, "relu"), mlp_reference(x, nw, 0.1, "relu"))


def test_callable_activation_is_accepted():
    w = _gated(16, 24, dtype=torch.float32)
    x = torch.randn(1, 16)
    torch.testing.assert_close(  # against the independent masked-dense oracle, not the reference it dispatches to
        sparse_gated_mlp(x, w, 0.05, torch.tanh), _masked_dense_gated(x, w, 0.05, torch.tanh)
    )


def test_forced_triton_backend_on_cpu_raises_a_clear_error():
    w = _gated(16, 24, dtype=torch.float32)
    with pytest.raises(NotImplementedError, match="(CUDA|triton)"):
        sparse_gated_mlp(torch.randn(1, 16), w, 0.0, config=SparseMLPConfig(backend="triton"))


@pytest.mark.parametrize(
    "kwargs, match",
    [({"backend": "cuda"}, "backend"), ({"scheme": "rows"}, "scheme"), ({"gate": "cudnn"}, "gate")],
)
def test_config_validation_names_the_bad_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparseMLPConfig(**kwargs)


def test_weight_validation_names_shapes():
    with pytest.raises(ValueError, match="w_up"):
        GatedMLPWeights(torch.zeros(4, 3), torch.zeros(3, 4), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="b_down"):
        MLPWeights(torch.zeros(4, 3), torch.zeros(4, 3), b_down=torch.zeros(4))
    with pytest.raises(ValueError, match="activation"):
        gated_mlp_reference(torch.zeros(1, 3), GatedMLPWeights(*[torch.zeros(4, 3)] * 3), 0.0, "swish")
    with pytest.raises(ValueError, match=r"a \(\.\.\., 5\) does not match w_down_t \(6, 4\) \(I, H\)"):
        sparse_down_proj(torch.zeros(2, 5), torch.zeros(6, 4))
    with pytest.raises(ValueError, match=r"does not match w_down_t \(6,\)"):
        sparse_down_proj(torch.zeros(2, 6), torch.zeros(6))


def test_triton_module_imports_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
        "import deftune.sparse.triton_mlp as m, deftune.sparse as s\n"
        "assert not m.HAS_TRITON and not s.HAS_TRITON\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize("gated", [True, False])
def test_triton_dispatch_passes_the_right_weights(monkeypatch, gated):
    """The glue of the Triton path (CPU: the launcher is replaced by a reference twin)."""
    from deftune.sparse import ops
    from deftune.sparse.reference import resolve_activation

    calls = []

    def fake_launch(x2d, *, w_gate, w_down_t, threshold, activation, w_up=None, b_gate=None, b_up=None,
                    b_down=None, gate_values=None, scheme="union", gate="triton", config=None, out=None):
        calls.append({"w_up": w_up is not None, "gate_values": gate_values is not None})
        a = resolve_activation(activation)(F.linear(x2d, w_gate, b_gate)) if gate_values is None else gate_values
        h = torch.where(a.abs() > threshold, a, torch.zeros_like(a))
        if w_up is not None:
            h = h * F.linear(x2d, w_up, b_up)
        y = h @ w_down_t + (0 if b_down is None else b_down)
        return y if out is None else out.copy_(y)

    monkeypatch.setattr(ops, "use_triton", lambda *a, **k: True)
    monkeypatch.setattr(ops.triton_mlp, "launch_sparse_mlp", fake_launch)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    if gated:
        w = _gated(8, 12, bias=True)
        y = sparse_gated_mlp(x, w, 0.1, "silu")
        ref = gated_mlp_reference(x, w, 0.1, "silu")
    else:
        w = MLPWeights(torch.randn(12, 8, dtype=torch.float64), torch.randn(12, 8, dtype=torch.float64),
                       torch.randn(12, dtype=torch.float64), torch.randn(8, dtype=torch.float64))
        y = sparse_mlp(x, w, 0.1, "gelu")
        ref = mlp_reference(x, w, 0.1, "gelu")
    assert calls == [{"w_up": gated, "gate_values": False}]
    torch.testing.assert_close(y, ref)


def test_activation_table_against_its_formulas():
    """The table the reference (and the kernels' tests) draw their activations from, checked
    against the formulas themselves, not against the table."""
    x = torch.linspace(-6, 6, 241, dtype=torch.float64)
    phi = 0.5 * (1 + torch.erf(x / 2**0.5))
    tanh = 0.5 * x * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (x + 0.044715 * x**3)))
    expected = {"identity": x, "silu": x / (1 + torch.exp(-x)), "gelu": x * phi, "gelu_tanh": tanh,
                "relu": x.clamp_min(0)}
    assert set(ACTIVATIONS) == set(expected)
    for name, want in expected.items():
        torch.testing.assert_close(ACTIVATIONS[name](x), want, rtol=1e-12, atol=1e-12, msg=name)
    assert (ACTIVATIONS["gelu"](x) - ACTIVATIONS["gelu_tanh"](x)).abs().max() > 1e-5  # the two GELUs differ


def test_auto_picks_and_explicit_choices_of_the_dispatch():
    from deftune.sparse import SparseMLPConfig
    from deftune.sparse.ops import _gate, use_triton

    assert _gate(SparseMLPConfig(gate="cublas"), 4) == "cublas"
    assert _gate(SparseMLPConfig(), 4) == "triton"
    w = torch.randn(8, 4, requires_grad=True)
    x = torch.randn(2, 4)
    import deftune.sparse.ops as ops

    with pytest.MonkeyPatch.context() as mp:  # as if the GPU case were supported
        mp.setattr(ops.triton_mlp, "check_supported", lambda *a: None)
        assert use_triton(x, SparseMLPConfig(backend="auto"), w) is False  # a weight wants gradients
        with pytest.raises(NotImplementedError, match="inference-only"):
            use_triton(x, SparseMLPConfig(backend="triton"), w)
        with torch.no_grad():
            assert use_triton(x, SparseMLPConfig(backend="auto"), w) is True


def test_a_thresholded_activation_thresholds_the_density_view_too():
    from torch import nn

    from deftune.sparse.thresholds import ThresholdedActivation

    class WithView(nn.Module):
        def forward(self, x):
            return x

        def density_output(self, x, output):
            return 2 * x  # another tensor than the output, as density-only scales give

    wrapped = ThresholdedActivation(WithView(), 0.5)
    x = torch.tensor([0.1, 0.4, 0.6, -0.3])
    out = wrapped(x)
    view = wrapped.density_output(x, out)
    assert out.tolist() == pytest.approx([0.0, 0.0, 0.6, 0.0])
    assert view.tolist() == pytest.approx([0.0, 0.8, 1.2, -0.6])  # 2x = [0.2, 0.8, 1.2, -0.6], |v| <= 0.5 -> 0


def test_gated_weights_from_linears_keep_each_bias_with_its_projection():
    from torch import nn

    from deftune.sparse.reference import GatedMLPWeights

    gate, up, down = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 4)
    w = GatedMLPWeights.from_linears(gate, up, down)
    assert w.b_gate is gate.bias and w.b_up is up.bias and w.b_down is down.bias
    assert torch.equal(w.w_down_t, down.weight.t())
