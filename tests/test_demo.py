"""The demo's side-by-side table: density changes carry their sign."""

from __future__ import annotations

import pytest

from deftune.demo import format_table
from deftune.runs import RunResult


def _run(alpha: float, layers: dict[str, float]) -> RunResult:
    overall = sum(layers.values()) / len(layers)
    return RunResult(name=f"a{alpha}", task="sst2", method="lora", alpha=alpha,
                     metric={"name": "accuracy", "value": 80.0}, density={"exact": overall, "per_layer": layers},
                     train_seconds=10.0)


def test_a_layer_whose_density_rises_shows_a_plus_sign():
    table = format_table(_run(0.0, {"encoder.0": 0.40, "encoder.1": 0.90}), _run(1.0, {"encoder.0": 0.48, "encoder.1": 0.45}))
    rows = {line.split()[0]: line for line in table.splitlines()[2:]}
    assert rows["encoder.0"].rstrip().endswith("+20.0%") and "-20.0%" not in table
    assert rows["encoder.1"].rstrip().endswith("−50.0%")


@pytest.mark.parametrize("kwargs, match", [({"alpha": 0.0}, "alpha"), ({"alpha": True}, "alpha"),
                                           ({"steps": 0}, "steps"), ({"train_subset": -1}, "train_subset")])
def test_demo_config_is_checked_where_it_enters(kwargs, match):
    from deftune.demo import DemoConfig

    with pytest.raises(ValueError, match=match):
        DemoConfig(**kwargs)
