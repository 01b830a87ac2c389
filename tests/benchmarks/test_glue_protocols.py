"""benchmarks/glue_protocols.py pools each protocol's pairs like the compare report does."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from deftune.runs import write_json_atomic

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "glue_protocols.py"


def _load():
    spec = importlib.util.spec_from_file_location("glue_protocols", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def _row(task, alpha, seed, metric, density, **extra):
    return {"task": task, "method": "lora", "alpha": alpha, "seed": seed, "steps": 2, "density": density,
            "metric": {"name": "accuracy", "value": metric}, "trainable_parameters": 1, "train_seconds": 1.0, **extra}


def test_fixed_alpha_threshold_route_and_selection_on_other_seeds(tmp_path):
    gp = _load()
    dev = str(tmp_path / "dev.json")
    write_json_atomic(dev, {"hardware": {"gpu": None}, "runs": [
        _row("sst2", 0.0, 0, 80.0, 1.0), _row("sst2", 0.1, 0, 78.0, 0.4), _row("sst2", 0.05, 0, 79.8, 0.8),
        _row("sst2", 0.0, 1, 82.0, 1.0), _row("sst2", 0.1, 1, 82.0, 0.6), _row("sst2", 0.05, 1, 81.0, 0.9),
        _row("sst2", 0.0, 1, 81.0, 0.5, act_threshold_density=0.5),
    ]})
    fixed = gp.evaluate(gp.Protocol("α = 0.1", "fixed", (dev,), (0, 1), 0.1))
    assert fixed["pairs"] == 2 and fixed["metric_delta"] == pytest.approx(-1.0)
    assert fixed["density_reduction_pct"] == pytest.approx(50.0) and fixed["metric_delta_se"] == pytest.approx(1.0)
    assert (fixed["meets_density"], fixed["meets_metric"], fixed["hardware"]) == (True, True, ["CPU"])
    assert fixed["cells"] == {"sst2/lora": pytest.approx(-1.0)}  # (-2 + 0) / 2 over the two seeds
    only_seed_1 = gp.evaluate(gp.Protocol("thr", "route", (dev,), (1,), "t0.5"))
    assert only_seed_1["pairs"] == 1 and only_seed_1["metric_delta"] == pytest.approx(-1.0)
    assert only_seed_1["metric_delta_se"] is None  # one seed: no error bar
    # choose on seed 0 (0.05 loses 0.2, 0.1 loses 2.0; tolerance 0.5 -> 0.05), report seed 1
    seed0 = str(tmp_path / "seed0.json")
    write_json_atomic(seed0, {"runs": [r for r in gp.load_rows(dev) if r["seed"] == 0]})
    chosen = gp.evaluate(gp.Protocol("per task", "other seeds", (dev,), (1,), select_from=seed0, tolerance=0.5))
    assert chosen["chosen"] == {"sst2": 0.05} and chosen["metric_delta"] == pytest.approx(-1.0)
    assert chosen["cells"] == {"sst2/lora": pytest.approx(-1.0)}  # the chosen α's cell, not α = 0.1's
    with pytest.raises(ValueError, match="reported seeds"):  # choosing on the reported seed is refused
        gp.evaluate(gp.Protocol("per task", "same seed", (dev,), (0,), select_from=dev))
    assert gp.evaluate(gp.Protocol("α = 0.1", "missing file", (str(tmp_path / "nope.json"),), (0,), 0.1)) is None
