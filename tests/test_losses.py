"""Density losses and schedules: hand-computed values, validation, the total-loss identity."""

from __future__ import annotations

import math

import pytest
import torch

from deftune.losses import DensityLossConfig, combine_layer_losses
from deftune.regularizer import DensityRegularizer


def test_l0_hand_values():
    fn = DensityLossConfig(loss="l0", eps=1e-7).surrogate()
    a = torch.tensor([0.0, 1e-3, -1.0])
    expected = [0.0, 1e-6 / (1e-6 + 1e-7), 1.0 / (1.0 + 1e-7)]
    assert fn(a).tolist() == pytest.approx(expected)


@pytest.mark.parametrize("name,value", [
    ("tanh", math.tanh(2 * 0.5)), ("sigmoid", 2 / (1 + math.exp(-2 * 0.5)) - 1), ("l1", 0.5),
])
def test_other_surrogates(name, value):
    fn = DensityLossConfig(loss=name, beta=2.0).surrogate()
    assert fn(torch.tensor([-0.5])).item() == pytest.approx(value, rel=1e-6)
    assert fn(torch.tensor([0.0])).item() == 0.0


def test_schedules():
    const = DensityLossConfig(alpha=2.0)
    assert const.alpha_at(0) == const.alpha_at(99) == 2.0
    lin = DensityLossConfig(alpha=2.0, schedule="linear", warmup_steps=10)
    assert [lin.alpha_at(s) for s in (0, 5, 10, 50)] == pytest.approx([0.0, 1.0, 2.0, 2.0])
    sine = DensityLossConfig(alpha=2.0, schedule="sine", warmup_steps=10)
    assert sine.alpha_at(5) == pytest.approx(2.0 * math.sin(math.pi / 4))
    assert sine.alpha_at(20) == pytest.approx(2.0)


@pytest.mark.parametrize("kwargs,match", [
    ({"loss": "l2"}, "unknown density loss 'l2'.*l0"),
    ({"alpha": -1.0}, "alpha must be"),
    ({"eps": -1e-7}, "eps must be"),
    ({"eps": 0.0}, "eps must be > 0"),
    ({"schedule": "cosine"}, "unknown alpha schedule"),
    ({"site": "gate"}, "site must be"),
    ({"warmup_steps": -1}, "warmup_steps"),
    ({"stack_weights": {"middle": 1.0}}, "stack_weights"),
    ({"stack_weights": {"decoder": float("nan")}}, "finite weights >= 0, got {'decoder': nan}"),
    ({"stack_weights": {"encoder": float("inf")}}, "finite weights >= 0, got {'encoder': inf}"),
    ({"alpha": True}, "alpha must be a finite number >= 0, got True"),
    ({"warmup_steps": 2.5}, "warmup_steps must be an integer >= 0, got 2.5"),
    ({"target": 0.0}, r"target must be None or a density in \(0, 1\], got 0.0"),
    ({"target": 1.5}, "target must be None or a density"),
    ({"target": float("nan")}, "target must be None or a density"),
    ({"target": 0.5, "loss": "l1"}, "l1 surrogate"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DensityLossConfig(**kwargs)


def test_combine_per_stack_weights():
    losses = {"encoder.0": torch.tensor(1.0), "encoder.1": torch.tensor(3.0), "decoder.0": torch.tensor(4.0)}
    stacks = {"encoder.0": "encoder", "encoder.1": "encoder", "decoder.0": "decoder"}
    # encoder mean 2, decoder mean 4; weights 1 and 3 -> (2 + 12) / 4
    assert combine_layer_losses(losses, stacks, {"encoder": 1.0, "decoder": 3.0}).item() == pytest.approx(3.5)
    with pytest.raises(RuntimeError, match="no density loss"):
        combine_layer_losses({}, stacks, {})


def test_total_loss_is_task_plus_alpha_density(bert):
    from tests.conftest import batch

    reg = DensityRegularizer(bert, DensityLossConfig(alpha=0.7))
    b = dict(batch(), labels=torch.tensor([0, 1, 0]))
    with reg:
        out = bert(**b)
        total, parts = reg.total_loss(out.loss, step=0)
    assert total.item() == pytest.approx(out.loss.item() + 0.7 * parts.density, rel=1e-6)
    assert parts.alpha == 0.7 and 0 < parts.density <= 1
    # alpha = 0: PEFT, same code path, total == task
    reg0 = DensityRegularizer(bert, DensityLossConfig(alpha=0.0))
    with reg0:
        out = bert(**b)
        total0, parts0 = reg0.total_loss(out.loss, step=0)
    assert total0.item() == pytest.approx(out.loss.item()) and parts0.density > 0


def test_layer_term_is_a_hinge_at_the_target():
    plain, hinge = DensityLossConfig(), DensityLossConfig(target=0.4)
    rho = torch.tensor([0.9, 0.4, 0.1])
    assert torch.equal(plain.layer_term(rho), rho)
    assert hinge.layer_term(rho).tolist() == pytest.approx([0.5, 0.0, 0.0])


def test_target_stops_the_density_gradient_of_layers_below_it(bert):
    """With a target above every layer's surrogate density the density loss is 0 and sends no
    gradient; with one between the layers' values only the denser layers are pushed, and the loss is
    the mean over all layers of their excess."""
    from tests.conftest import batch

    b = dict(batch(), labels=torch.tensor([0, 1, 0]))
    with DensityRegularizer(bert, DensityLossConfig(alpha=1.0)) as reg:
        bert(**b)
        rho = {k: float(v.detach()) for k, v in reg.recorder.pop_losses().items()}
    assert len(rho) >= 2 and max(rho.values()) > min(rho.values())
    target = (max(rho.values()) + min(rho.values())) / 2  # the densest layer above it, the sparsest below
    with DensityRegularizer(bert, DensityLossConfig(alpha=1.0, target=target)) as reg:
        bert(**b)
        loss = reg.density_loss()
    expected = sum(max(0.0, v - target) for v in rho.values()) / len(rho)
    assert loss.item() == pytest.approx(expected, rel=1e-5) and loss.item() > 0
    with DensityRegularizer(bert, DensityLossConfig(alpha=1.0, target=1.0)) as reg:
        bert.zero_grad()
        bert(**b)
        loss = reg.density_loss()
        loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in bert.parameters())


def test_l0_uses_the_configured_eps():
    assert DensityLossConfig(eps=1.0).surrogate()(torch.tensor([1.0, 3.0])).tolist() == pytest.approx([0.5, 0.9])


@pytest.mark.parametrize("schedule", ["linear", "sine"])
def test_a_ramp_of_zero_steps_is_the_full_alpha_from_step_0(schedule):
    assert DensityLossConfig(alpha=2.0, schedule=schedule, warmup_steps=0).alpha_at(0) == 2.0


def test_combine_with_every_stack_weighted_zero_is_zero_not_nan():
    out = combine_layer_losses({"encoder.0": torch.tensor(0.4)}, {"encoder.0": "encoder"}, {"encoder": 0.0})
    assert out.item() == 0.0


def test_total_loss_uses_the_alpha_of_its_step(bert):
    """During warm-up the density term enters with alpha(step), as logged, not the final alpha."""
    from tests.conftest import batch

    reg = DensityRegularizer(bert, DensityLossConfig(alpha=1.0, schedule="linear", warmup_steps=10))
    b = dict(batch(), labels=torch.tensor([0, 1, 0]))
    with reg:
        for step, alpha in ((0, 0.0), (5, 0.5)):
            out = bert(**b)
            total, parts = reg.total_loss(out.loss, step=step)
            assert parts.alpha == alpha
            assert total.item() == pytest.approx(out.loss.item() + alpha * parts.density, rel=1e-6)


@pytest.mark.parametrize("count_padding", [False, True])
def test_regularizer_passes_padding_and_leading_tokens_to_its_recorder(bert, count_padding):
    """The loss and the statistics count real tokens unless ``count_padding``, less ``skip_leading``."""
    from tests.conftest import batch

    b = batch(b=2, t=7, pad_last=3)  # 7 + 4 real tokens
    reg = DensityRegularizer(bert, DensityLossConfig(count_padding=count_padding), skip_leading=2)
    with reg, torch.no_grad():
        bert(**b)
    tokens = {layer.tokens for layer in reg.recorder.result().per_layer.values()}
    assert tokens == {14 - 4 if count_padding else 11 - 4}


def test_defaults_are_the_papers():
    """DEFT (Runwal et al. 2025) and its code: the l0 surrogate a²/(a²+ε) with ε = 1e-7, α = 1."""
    cfg = DensityLossConfig()
    assert (cfg.loss, cfg.eps, cfg.alpha) == ("l0", 1e-7, 1.0)
    a = torch.tensor([1e-3, 0.0])
    torch.testing.assert_close(cfg.surrogate()(a), a**2 / (a**2 + 1e-7))
