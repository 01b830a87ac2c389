"""Gate parameterisations and configs."""

from __future__ import annotations

import math

import pytest
import torch

from deftune.ada import GATES, AdaConfig, HardConcreteGates, SigmoidGates, make_gates


def test_registry_holds_both_parameterisations():
    assert {"sigmoid", "hard_concrete"} <= set(GATES)
    with pytest.raises(ValueError, match="unknown gate parameterisation 'relu'"):
        make_gates("relu", 3)


def test_sigmoid_init_and_penalty():
    gates = SigmoidGates(4, init=0.8, logit_scale=5.0, temperature=2.0)
    torch.testing.assert_close(gates.deterministic(), torch.full((4,), 0.8))
    torch.testing.assert_close(gates.sample(), gates.deterministic())
    assert math.isclose(float(gates.penalty().detach()), 0.8, rel_tol=1e-6)
    # the logit scale multiplies theta
    torch.testing.assert_close(gates.logits, gates.theta * 5.0)


def test_hard_concrete_matches_louizos_formulas():
    gates = HardConcreteGates(3, init=0.5)
    with torch.no_grad():
        gates.theta.copy_(torch.tensor([5.0, 0.0, -5.0]))
    det = gates.deterministic()
    # clip(sigmoid(log_alpha) * 1.2 - 0.1, 0, 1)
    expected = (torch.sigmoid(gates.theta) * 1.2 - 0.1).clamp(0, 1)
    torch.testing.assert_close(det, expected)
    assert det[0] == 1.0 and det[2] == 0.0 and 0 < det[1] < 1
    p_open = torch.sigmoid(gates.theta - (2 / 3) * math.log(0.1 / 1.1))
    torch.testing.assert_close(gates.penalty(), p_open.mean())


def test_hard_concrete_samples_hit_exact_zero_and_one():
    torch.manual_seed(0)
    gates = HardConcreteGates(1, init=0.5)
    samples = torch.stack([gates.sample() for _ in range(2000)]).squeeze(-1)
    assert samples.min() == 0.0 and samples.max() == 1.0
    assert ((samples > 0) & (samples < 1)).any()
    # the empirical P(g != 0) matches the closed form used as the penalty
    assert abs(float((samples > 0).float().mean()) - float(gates.penalty().detach())) < 0.04


@pytest.mark.parametrize("theta", [2.0, -2.0])
def test_hard_concrete_samples_follow_the_sign_of_the_logit(theta):
    """At log_alpha = 0 the sampler is symmetric, so a sign error in it cannot show: at ±2 the
    empirical P(g > 0) must match the closed-form penalty, and be above / below one half."""
    torch.manual_seed(1)
    gates = HardConcreteGates(1, init=0.5)
    with torch.no_grad():
        gates.theta.fill_(theta / gates.logit_scale)
    samples = torch.stack([gates.sample() for _ in range(4000)]).squeeze(-1)
    p_open = float((samples > 0).float().mean())
    assert abs(p_open - float(gates.penalty().detach())) < 0.03
    assert (p_open > 0.8) if theta > 0 else (p_open < 0.5)


def test_sample_is_differentiable():
    gates = HardConcreteGates(2, init=0.5)
    gates.sample().sum().backward()
    assert gates.theta.grad is not None


def test_train_and_eval_modes():
    gates = HardConcreteGates(2, init=0.5)
    gates.eval()
    torch.testing.assert_close(gates(), gates.deterministic())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"gate": "step"}, "unknown gate parameterisation 'step'"),
        ({"init": 1.0}, "init must be strictly between 0 and 1"),
        ({"penalty": -1.0}, "penalty must be"),
        ({"logit_scale": 0.0}, "logit_scale must be"),
        ({"density_weighting": "inverse"}, "density_weighting='inverse'"),
        ({"penalty_warmup_steps": -3}, "penalty_warmup_steps"),
        ({"penalty_warmup_steps": True}, "penalty_warmup_steps"),
    ],
)
def test_ada_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdaConfig(**kwargs)


def test_penalty_warmup():
    cfg = AdaConfig(penalty=0.2, penalty_warmup_steps=10)
    assert cfg.penalty_at(0) == 0.0
    assert math.isclose(cfg.penalty_at(5), 0.1)
    assert cfg.penalty_at(50) == 0.2
