"""benchmarks/prompt_recipe_search.py: the candidates' commands parse, and the rule picks the best mean."""

from __future__ import annotations

import importlib.util
import shlex
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "prompt_recipe_search.py"


@pytest.fixture
def rs(monkeypatch):
    spec = importlib.util.spec_from_file_location("prompt_recipe_search", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def _row(task, value, method="prompt", seed=0, alpha=0.0, split="holdout", **extra):
    return {"task": task, "method": method, "alpha": alpha, "seed": seed, "steps": 250, "density": 1.0,
            "metric": {"name": "accuracy", "value": value}, "eval_split": split, "holdout": 500, **extra}


def test_every_candidate_is_a_valid_compare_command(rs):
    from deftune.cli import build_parser
    from deftune.cli._args import dataclass_from_args
    from deftune.compare import CompareConfig

    cmds = rs.commands()
    assert len(cmds) == sum(len(c) for c in rs.CANDIDATES.values()) == 12
    planned = [(m, lr, opts) for m, cands in rs.CANDIDATES.items() for lr, opts in cands]
    results = set()
    for cmd, (method, lr, opts) in zip(cmds, planned):
        args = build_parser().parse_args(shlex.split(cmd)[1:])
        cfg = dataclass_from_args(CompareConfig, args)  # validates methods, lr and options
        assert cfg.methods == (method,) and cfg.holdout == 500 and cfg.alphas == (0.0,) and cfg.seeds == (0, 1)
        assert cfg.method_lr == {method: lr} and cfg.method_options == {method: opts}  # False stays a bool
        results.add(cfg.results_json)
    assert len(results) == 12  # one results file per recipe


def test_rule_picks_the_highest_mean_over_dense_held_out_runs(rs, monkeypatch):
    monkeypatch.setattr(rs, "TASKS", ("sst2", "rte"))
    monkeypatch.setattr(rs, "SEEDS", (0,))
    rows = [
        # the recipe of rows written before lr was recorded: METHOD_LR's 0.03, default start
        _row("sst2", 50.0), _row("rte", 50.0),
        _row("sst2", 70.0, lr=0.03, method_options={"prompt_init": "vocab"}),
        _row("rte", 40.0, lr=0.03, method_options={"prompt_init": "vocab"}),  # mean 55
        _row("sst2", 60.0, lr=0.1, method_options={"prompt_init": "random"}),  # default start, spelled out
        _row("rte", 60.0, lr=0.1),  # mean 60: chosen
        _row("sst2", 99.0, lr=0.3, alpha=0.1),  # a DEFT run: not a candidate
        _row("sst2", 99.0, lr=0.3, split="dev"),  # dev: not a candidate
        _row("sst2", 61.0, method="prefix", lr=0.01), _row("rte", 61.0, method="prefix", lr=0.01),
        _row("sst2", 90.0, method="prefix", lr=0.03),  # best mean, but its rte run is missing: not eligible
        _row("rte", 99.0, method="prefix", lr=0.03, seed=1),  # not a planned seed
        _row("rte", 99.0, method="prefix", lr=0.03, holdout=100),  # not the planned held-out draw
    ]
    out = rs.search(rows)
    prompt = out["prompt"]
    assert prompt["chosen"] == {"lr": 0.1, "method_options": {}}
    assert [(c["lr"], c["method_options"], c["runs"], c["mean"]) for c in prompt["candidates"]] == [
        (0.1, {}, 2, 60.0), (0.03, {"prompt_init": "vocab"}, 2, 55.0), (0.03, {}, 2, 50.0)]
    assert prompt["candidates"][1]["per_task"] == {"rte": 40.0, "sst2": 70.0}
    assert out["prefix"]["chosen"] == {"lr": 0.01, "method_options": {}}
    first = out["prefix"]["candidates"][0]
    assert (first["lr"], first["runs"], first["complete"]) == (0.03, 1, False)
