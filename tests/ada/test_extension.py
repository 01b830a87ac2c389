"""AdaExtension: gates in the forward pass, the penalty, density-loss weights, saved state."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import save_file

from deftune.ada import AdaConfig, AdaExtension, SkipPlan, load_gates, skip_mlps_
from deftune.losses import DensityLossConfig
from deftune.regularizer import DensityRegularizer


def _set_logits(ext: AdaExtension, values):
    with torch.no_grad():
        ext.gates.theta.copy_(torch.tensor(values, dtype=torch.float32) / ext.gates.logit_scale)


def test_open_gates_reproduce_the_model_exactly(case, logits):
    model = case.build().eval()
    inputs = case.inputs()
    before = logits(model, inputs)
    ext = AdaExtension(AdaConfig(gate="hard_concrete", init=0.99))  # inference gate clip(1.088) = 1
    ext.prepare(model)
    try:
        assert all(v == 1.0 for v in ext.gate_values().values())
        assert torch.equal(logits(model, inputs), before)
    finally:
        ext.close()


def test_closed_gates_equal_skipped_blocks(case, logits):
    model = case.build().eval()
    inputs = case.inputs()
    ext = AdaExtension(AdaConfig(gate="hard_concrete"))
    ext.prepare(model)
    n = len(ext.sites)
    _set_logits(ext, [10.0] + [-10.0] * (n - 1))  # keep the first block, close the rest
    gated = logits(model, inputs)
    gates = ext.gate_values()
    ext.close()
    assert sorted(set(gates.values())) == [0.0, 1.0]
    skip_mlps_(model, SkipPlan(skip=[k for k, v in gates.items() if v == 0.0]))
    torch.testing.assert_close(logits(model, inputs), gated, rtol=0, atol=1e-6)


def test_penalty_and_gradients_reach_the_gates(bert_case):
    model = bert_case.build().train()
    inputs = bert_case.inputs()
    ext = AdaExtension(AdaConfig(gate="sigmoid", init=0.5, penalty=0.1, density_weighting="uniform"))
    ext.prepare(model)
    out = model(**inputs, labels=torch.tensor([0, 1]))
    extra = ext.extra_loss(model, step=0)
    # λ · mean openness: sigmoid gates at 0.5 are half open
    assert ext.gates.penalty().item() == pytest.approx(0.5) and extra.item() == pytest.approx(0.1 * 0.5)
    loss = out.loss + extra
    loss.backward()
    grad = ext.gates.theta.grad
    assert grad is not None and torch.isfinite(grad).all() and (grad != 0).all()
    assert ext.trainable_parameters()[0] is ext.gates.theta
    ext.close()


def test_gates_weight_the_density_loss(bert_case):
    model = bert_case.build().train()
    inputs = bert_case.inputs()
    ext = AdaExtension(AdaConfig(gate="sigmoid", density_weighting="gate"))
    ext.prepare(model)
    _set_logits(ext, [3.0, 0.0, -3.0])
    reg = DensityRegularizer(model, DensityLossConfig(alpha=1.0))
    ext.bind_regularizer(reg)
    with reg:
        model(**inputs)
        raw = {k: v.detach() for k, v in reg.recorder.losses.items()}
        weighted = reg.density_loss()
    g = torch.sigmoid(torch.tensor([3.0, 0.0, -3.0]))
    w = g / g.mean()
    expected = sum(w[i] * raw[f"encoder.{i}"] for i in range(3)) / 3
    torch.testing.assert_close(weighted.detach(), expected)
    assert set(ext.layer_weights) == {"encoder.0", "encoder.1", "encoder.2"}
    assert ext.log()["ada/density_weighting_bound"] == 1.0
    ext.close()


def test_unbound_extension_warns_once(bert_case):
    ext = AdaExtension(AdaConfig())
    ext.prepare(bert_case.build())
    with pytest.warns(UserWarning, match="bind_regularizer"):
        ext.extra_loss(None, 0)
    with warnings.catch_warnings(record=True) as later:
        warnings.simplefilter("always")
        ext.extra_loss(None, 1)
    assert not [w for w in later if "bind_regularizer" in str(w.message)], "warned a second time"
    ext.close()


def test_a_few_steps_close_gates_under_a_strong_penalty(bert_case):
    torch.manual_seed(0)
    model = bert_case.build().train()
    inputs = bert_case.inputs()
    labels = torch.tensor([0, 1])
    for p in model.parameters():
        p.requires_grad_(False)
    ext = AdaExtension(
        AdaConfig(gate="hard_concrete", penalty=1.0, logit_scale=10.0, density_weighting="uniform")
    )
    ext.prepare(model)
    start = ext.gates.logits.detach().clone()
    opt = torch.optim.Adam(ext.trainable_parameters(), lr=0.1)
    for step in range(30):
        loss = model(**inputs, labels=labels).loss + ext.extra_loss(model, step)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert (ext.gates.logits < start).all()
    assert all(v == 0.0 for v in ext.gate_values().values())
    ext.close()


def test_state_dict_round_trips_through_a_run_dir(case, tmp_path):
    model = case.build()
    ext = AdaExtension(AdaConfig(gate="sigmoid"))
    ext.prepare(model)
    _set_logits(ext, [float(i) - 1.0 for i in range(len(ext.sites))])
    state = {f"0.{k}": v for k, v in ext.state_dict().items()}  # the loop prefixes the index
    save_file(state, str(tmp_path / "extension.safetensors"))
    loaded = load_gates(tmp_path)
    assert loaded is not None
    assert list(loaded) == [s.name for s in ext.sites]
    for name, value in ext.gate_values().items():
        assert abs(loaded[name] - value) < 1e-6
    assert load_gates(tmp_path / "missing") is None
    ext.close()


def test_training_passes_sample_gates_and_inference_passes_do_not(bert_case):
    """Hard-concrete gates: a fresh sample per training pass, the deterministic gate otherwise."""
    model = bert_case.build()
    for m in model.modules():  # no dropout: any change between passes comes from the gates
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    inputs = bert_case.inputs()
    ext = AdaExtension(AdaConfig(gate="hard_concrete", init=0.5, density_weighting="uniform"))
    ext.prepare(model)
    seen: list[torch.Tensor] = []
    ext.hooks.on_gates = lambda g: seen.append(g.detach().clone())
    try:
        model.train()
        torch.manual_seed(0)
        model(**inputs)
        model(**inputs)
        with torch.no_grad():  # a no-grad pass in train mode (e.g. a logging pass) is inference
            model(**inputs)
        model.eval()
        model(**inputs)
    finally:
        ext.close()
    deterministic = ext.gates.deterministic().detach()
    assert len(seen) == 4
    assert not torch.equal(seen[0], seen[1]), "two training passes drew the same gates"
    assert not torch.equal(seen[0], deterministic)
    torch.testing.assert_close(seen[2], deterministic, rtol=0, atol=0)
    torch.testing.assert_close(seen[3], deterministic, rtol=0, atol=0)


@pytest.mark.parametrize("weighting, grads", [("gate", False), ("gate_grad", True)])
def test_density_weights_carry_gate_gradients_only_under_gate_grad(bert_case, weighting, grads):
    model = bert_case.build().train()
    ext = AdaExtension(AdaConfig(gate="sigmoid", density_weighting=weighting))
    ext.prepare(model)
    _set_logits(ext, [2.0, 0.0, -2.0])
    reg = DensityRegularizer(model, DensityLossConfig(alpha=1.0))
    ext.bind_regularizer(reg)
    try:
        with torch.no_grad():
            model(**bert_case.inputs())  # the weights as a pass sets them, without autograd noise
        ext._set_density_weights(ext.gates.sample())  # ...and as a training pass sets them
    finally:
        ext.close()
    weights = [ext.layer_weights[f"encoder.{i}"] for i in range(3)]
    assert all(w.requires_grad == grads for w in weights)
    if grads:  # weights w_l = g_l / mean(g): d(w_0 - w_2)/d theta is non-zero for every gate
        (grad,) = torch.autograd.grad(weights[0] - weights[2], [ext.gates.theta])
        assert (grad.abs() > 0).all()


def test_density_weights_are_normalised_per_stack(case):
    """Encoder and decoder weights each average 1 (T5: two stacks; others: one)."""
    model = case.build().train()
    ext = AdaExtension(AdaConfig(gate="sigmoid", density_weighting="gate"))
    ext.prepare(model)
    n = len(ext.sites)
    _set_logits(ext, [1.5 - i for i in range(n)])
    reg = DensityRegularizer(model, DensityLossConfig(alpha=1.0))
    ext.bind_regularizer(reg)
    try:
        with torch.no_grad():
            model(**case.inputs())
    finally:
        ext.close()
    g = torch.sigmoid(torch.tensor([1.5 - i for i in range(n)]))
    by_stack: dict[str, list[int]] = {}
    for i, s in enumerate(ext.sites):
        by_stack.setdefault(s.stack, []).append(i)
    assert len(by_stack) == (2 if case.name == "t5" else 1)
    for idx in by_stack.values():
        expected = g[idx] / g[idx].mean()
        got = torch.stack([ext.layer_weights[ext.sites[i].name] for i in idx])
        torch.testing.assert_close(got, expected)


def test_saved_gates_are_the_inference_gates_not_a_sample(bert_case):
    model = bert_case.build().train()  # training mode: a sample would differ from the gate
    ext = AdaExtension(AdaConfig(gate="hard_concrete"))
    ext.prepare(model)
    _set_logits(ext, [0.3, -0.2, 0.1])
    try:
        state = ext.state_dict()
    finally:
        ext.close()
    torch.testing.assert_close(state["ada.gates"], ext.gates.deterministic().detach(), rtol=0, atol=0)
    torch.testing.assert_close(state["ada.logits"], torch.tensor([0.3, -0.2, 0.1]))
    assert state["ada.blocks"].tolist() == [[0, 0], [0, 1], [0, 2]]


def test_a_deep_copy_of_a_gated_model_keeps_gates_of_its_own(bert_case, logits):
    """A snapshot taken while gates are attached (e.g. a "best model" copy) must not follow the
    original's gates as they train, nor lose its gating when the original's extension closes."""
    import copy

    model = bert_case.build().eval()
    inputs = bert_case.inputs()
    plain = logits(model, inputs)
    ext = AdaExtension(AdaConfig(gate="sigmoid", init=0.5))
    ext.prepare(model)
    snapshot = copy.deepcopy(model)
    before = logits(snapshot, inputs)
    assert not torch.allclose(before, plain)  # gated at 0.5
    with torch.no_grad():
        ext.gates.theta.fill_(-3.0)  # the original's gates move
    assert torch.equal(logits(snapshot, inputs), before)
    assert not torch.equal(logits(model, inputs), before)
    ext.close()
    assert torch.equal(logits(model, inputs), plain) and torch.equal(logits(snapshot, inputs), before)
