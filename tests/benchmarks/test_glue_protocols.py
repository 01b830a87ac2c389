"""benchmarks/glue_protocols.py pools each protocol's pairs like the compare report does."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from deftune.runs import read_json, write_json_atomic

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "glue_protocols.py"


@pytest.fixture
def gp(monkeypatch):
    spec = importlib.util.spec_from_file_location("glue_protocols", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _row(task, alpha, seed, metric, density, method="lora", **extra):
    return {"task": task, "method": method, "alpha": alpha, "seed": seed, "steps": 2, "density": density,
            "metric": {"name": "accuracy", "value": metric}, "trainable_parameters": 1, "train_seconds": 1.0, **extra}


def _write(root, name, rows, gpu="H100"):
    write_json_atomic(root / name, {"hardware": {"gpu": gpu}, "runs": rows})
    return name


def test_fixed_alpha_pools_files_tasks_and_methods(gp, tmp_path):
    a = _write(tmp_path, "a.json", [
        _row("sst2", 0.0, 0, 80.0, 1.0), _row("sst2", 0.1, 0, 78.0, 0.4),  # -2, 60 %
        _row("sst2", 0.0, 0, 70.0, 1.0, "ia3"), _row("sst2", 0.1, 0, 70.0, 0.8, "ia3"),  # 0, 20 %
        _row("sst2", 0.0, 1, 82.0, 1.0), _row("sst2", 0.1, 1, 82.0, 0.6),  # 0, 40 %
        _row("sst2", 0.0, 1, 70.0, 1.0, "ia3"), _row("sst2", 0.1, 1, 69.0, 0.8, "ia3"),  # -1, 20 %
        _row("sst2", 0.0, 1, 81.0, 0.5, act_threshold_density=0.5),  # threshold route: not α = 0.1
    ])
    b = _write(tmp_path, "b.json", [_row("rte", 0.0, 0, 50.0, 1.0), _row("rte", 0.1, 0, 51.0, 0.5)], gpu=None)
    r = gp.evaluate(gp.Protocol("x", "α = 0.1", "fixed", (a, b), (0, 1), 0.1), root=tmp_path)
    assert (r["status"], r["pairs"], r["peft_runs"], r["seeds"]) == ("ok", 5, 5, [0, 1])
    assert r["metric_delta"] == pytest.approx((-2 + 0 + 0 - 1 + 1) / 5)
    assert r["density_reduction_pct"] == pytest.approx((60 + 20 + 40 + 20 + 50) / 5)
    # seed means: seed 0 (-2 + 0 + 1) / 3 = -1/3, seed 1 -1/2 -> sd 0.1179, SE sd / sqrt(2)
    assert r["metric_delta_se"] == pytest.approx(abs(-1 / 3 + 1 / 2) / 2**0.5 / 2**0.5)
    assert r["cells"] == {"sst2/lora": pytest.approx(-1.0), "sst2/ia3": pytest.approx(-0.5),
                          "rte/lora": pytest.approx(1.0)}  # worst first
    assert r["hardware"] == ["CPU", "H100"] and (r["meets_density"], r["meets_metric"]) == (False, True)  # 38 %
    # leave one method out: the pairs of the others, pooled
    assert r["without"]["ia3"] == {"pairs": 3, "density_reduction_pct": pytest.approx(50.0),
                                   "metric_delta": pytest.approx(-1 / 3)}
    assert r["without"]["lora"]["pairs"] == 2 and r["without"]["lora"]["metric_delta"] == pytest.approx(-0.5)


def test_method_files_take_a_methods_rows_from_their_own_file(gp, tmp_path):
    main = _write(tmp_path, "main.json", [
        _row("sst2", 0.0, 0, 80.0, 1.0), _row("sst2", 0.1, 0, 78.0, 0.4),
        _row("sst2", 0.0, 0, 60.0, 1.0, "prompt"), _row("sst2", 0.1, 0, 50.0, 0.5, "prompt"),  # replaced
    ])
    own = _write(tmp_path, "own.json", [
        _row("sst2", 0.0, 0, 70.0, 1.0, "prompt"), _row("sst2", 0.1, 0, 71.0, 0.2, "prompt"),
        _row("sst2", 0.0, 0, 10.0, 1.0, "ia3"), _row("sst2", 0.1, 0, 0.0, 1.0, "ia3"),  # not this file's method
    ])
    p = gp.Protocol("m", "α = 0.1", "own recipe", (main,), (0,), 0.1, method_files=((own, ("prompt",)),))
    r = gp.evaluate(p, root=tmp_path)
    assert r["files"] == [main, own] and r["cells"] == {"sst2/lora": pytest.approx(-2.0), "sst2/prompt": pytest.approx(1.0)}
    assert r["pairs"] == r["peft_runs"] == 2 and r["without"]["prompt"]["metric_delta"] == pytest.approx(-2.0)
    assert gp._without(r) == "−60.0 % / -2.00"
    alone = gp.evaluate(gp.Protocol("a", "α = 0.1", "one method", (own,), (0,), 0.1), root=tmp_path)
    assert alone["without"]["ia3"]["pairs"] == 1 and gp._without({"without": {}}) == "–"
    with pytest.raises(ValueError, match="count twice"):
        gp.Protocol("d", "α = 0.1", "?", (own,), (0,), 0.1, method_files=((own, ("prompt",)),))
    with pytest.raises(ValueError, match="does not take method_files"):
        gp.Protocol("s", "per task", "?", (main,), (0,), select_from=main, method_files=((own, ("prompt",)),))


def test_threshold_route_selection_on_other_seeds_and_incomplete_grids(gp, tmp_path):
    dev = _write(tmp_path, "dev.json", [
        _row("sst2", 0.0, 1, 82.0, 1.0), _row("sst2", 0.1, 1, 82.0, 0.6), _row("sst2", 0.05, 1, 81.0, 0.9),
        _row("sst2", 0.0, 1, 81.0, 0.5, act_threshold_density=0.5),
        _row("sst2", 0.0, 2, 80.0, 1.0),  # seed 2: PEFT only, nothing to pair with yet
    ])
    thr = gp.evaluate(gp.Protocol("t", "thr", "route", (dev,), (1,), "t0.5"), root=tmp_path)
    assert thr["status"] == "ok" and thr["metric_delta"] == pytest.approx(-1.0) and thr["metric_delta_se"] is None
    # choose on seed 0 (0.05 loses 0.2, 0.1 loses 2.0; tolerance 0.5 -> 0.05), report seed 1
    seed0 = _write(tmp_path, "seed0.json", [_row("sst2", 0.0, 0, 80.0, 1.0), _row("sst2", 0.1, 0, 78.0, 0.4),
                                            _row("sst2", 0.05, 0, 79.8, 0.8)])
    chosen = gp.evaluate(gp.Protocol("c", "per task", "other seeds", (dev,), (1,), select_from=seed0, tolerance=0.5),
                         root=tmp_path)
    assert chosen["chosen"] == {"sst2": 0.05} and chosen["metric_delta"] == pytest.approx(-1.0)
    assert chosen["cells"] == {"sst2/lora": pytest.approx(-1.0)}  # the chosen α's cell, not α = 0.1's
    with pytest.raises(ValueError, match="reported seeds"):  # choosing on a reported seed is refused
        gp.evaluate(gp.Protocol("s", "per task", "same seed", (seed0,), (0,), select_from=seed0), root=tmp_path)
    # seed 2 asked for but not finished: scored, and marked incomplete
    part = gp.evaluate(gp.Protocol("p", "α = 0.1", "fixed", (dev,), (1, 2), 0.1), root=tmp_path)
    assert (part["status"], part["pairs"], part["peft_runs"]) == ("incomplete", 1, 2)
    assert gp._verdict(part) == "incomplete (1 of 2 pairs)"
    gone = gp.evaluate(gp.Protocol("m", "α = 0.1", "fixed", ("nope.json",), (0,), 0.1), root=tmp_path)
    assert gone == {**gone, "status": "missing", "absent": ["nope.json"]}
    with pytest.raises(ValueError, match="exactly one of key"):
        gp.Protocol("bad", "?", "?", (dev,), (0,))


def test_vs_plain_peft_swaps_only_the_dense_baseline(gp, tmp_path):
    """The last column pairs each DEFT run with the plain-PEFT run (no learned scales) of the same
    task, method, seed and steps; it is left out where that baseline does not exist for every pair."""
    main = _write(tmp_path, "main.json", [
        _row("sst2", 0.0, 0, 80.0, 1.0, act_scale="layer"), _row("sst2", 0.1, 0, 78.0, 0.4, act_scale="layer"),
        _row("rte", 0.0, 0, 50.0, 0.9, act_scale="layer"), _row("rte", 0.1, 0, 51.0, 0.45, act_scale="layer"),
    ])
    _write(tmp_path, gp.PLAIN, [
        _row("sst2", 0.0, 0, 83.0, 0.8, act_scale="none"), _row("rte", 0.0, 0, 52.0, 1.0),  # no key: "none"
        # none of these is a twin: other steps, eval split or learning rate, a scaled or a threshold run
        _row("sst2", 0.0, 0, 99.0, 1.0, act_scale="none", steps=6),
        _row("sst2", 0.0, 0, 98.0, 1.0, act_scale="none", eval_split="holdout"),
        _row("sst2", 0.0, 0, 97.0, 1.0, act_scale="none", lr=0.5),
        _row("sst2", 0.0, 0, 10.0, 1.0, act_scale="layer"),
        _row("sst2", 0.0, 0, 11.0, 0.5, act_scale="none", act_threshold_density=0.5),
    ])
    r = gp.evaluate(gp.Protocol("x", "α = 0.1", "fixed", (main,), (0,), 0.1), root=tmp_path)
    assert r["metric_delta"] == pytest.approx(-0.5)  # against the file's own (scaled) PEFT runs
    v = r["vs_plain_peft"]  # sst2 78 vs 83 (-5), density 0.4 vs 0.8 (50 %); rte 51 vs 52 (-1), 0.45 vs 1.0 (55 %)
    assert v["pairs"] == 2 and v["metric_delta"] == pytest.approx(-3.0)
    assert v["density_reduction_pct"] == pytest.approx(52.5) and gp._plain(r) == "−52.5 % / -3.00"
    # no plain twin for a pair (seed 1), another machine, or a method with a recipe of its own: no column
    scaled = {"act_scale": "layer"}
    more = _write(tmp_path, "more.json", [_row("sst2", 0.0, 1, 80.0, 1.0, **scaled), _row("sst2", 0.1, 1, 79.0, 0.5, **scaled)])
    assert gp.evaluate(gp.Protocol("s", "α = 0.1", "?", (more,), (1,), 0.1), root=tmp_path)["vs_plain_peft"] is None
    cpu = _write(tmp_path, "cpu.json", [_row("sst2", 0.0, 0, 80.0, 1.0, **scaled), _row("sst2", 0.1, 0, 79.0, 0.5, **scaled)],
                 gpu=None)
    assert gp.evaluate(gp.Protocol("c", "α = 0.1", "?", (cpu,), (0,), 0.1), root=tmp_path)["vs_plain_peft"] is None
    # dense runs without scales are plain PEFT already: the protocol is its own baseline (any machine, any steps)
    plain_cpu = _write(tmp_path, "plain_cpu.json", [_row("sst2", 0.0, 0, 80.0, 1.0, steps=9),
                                                    _row("sst2", 0.1, 0, 79.0, 0.5, steps=9)], gpu=None)
    own_plain = gp.evaluate(gp.Protocol("p", "α = 0.1", "?", (plain_cpu,), (0,), 0.1), root=tmp_path)
    assert own_plain["vs_plain_peft"] == {"pairs": 1, "density_reduction_pct": pytest.approx(50.0),
                                          "metric_delta": pytest.approx(-1.0), "metric_delta_se": None}
    # a method taken from a file of its own takes its plain twins from that file, not from PLAIN
    prompt = [_row("sst2", 0.0, 0, 70.0, 1.0, "prompt", **scaled), _row("sst2", 0.1, 0, 69.0, 0.5, "prompt", **scaled)]
    own_file = _write(tmp_path, "own.json", prompt)
    _write(tmp_path, gp.PLAIN, [_row("sst2", 0.0, 0, 83.0, 0.8, act_scale="none"), _row("rte", 0.0, 0, 52.0, 1.0),
                                _row("sst2", 0.0, 0, 99.0, 1.0, "prompt", act_scale="none")])  # not the file's own twin
    own = gp.Protocol("o", "α = 0.1", "?", (main,), (0,), 0.1, method_files=((own_file, ("prompt",)),))
    assert gp.evaluate(own, root=tmp_path)["vs_plain_peft"] is None and gp._plain({}) == "–"  # none in its file
    _write(tmp_path, "own.json", prompt + [_row("sst2", 0.0, 0, 72.0, 0.9, "prompt", act_scale="none")])
    v = gp.evaluate(own, root=tmp_path)["vs_plain_peft"]  # + prompt 69 vs 72 (-3), 0.5 vs 0.9
    assert v["pairs"] == 3 and v["metric_delta"] == pytest.approx(-3.0)


def test_twin_key_ignores_which_losses_move_the_scales(gp):
    plain = _row("sst2", 0.0, 0, 80.0, 1.0, act_scale="none")
    density_only = _row("sst2", 0.0, 0, 80.0, 1.0, act_scale="layer", method_options={"act_scale_grad": "density"})
    assert gp._twin_key(density_only) == gp._twin_key(plain)
    other = _row("sst2", 0.0, 0, 80.0, 1.0, act_scale="layer", method_options={"act_scale_grad": "density", "r": 4})
    assert gp._twin_key(other) != gp._twin_key(plain)  # any other option still tells runs apart


def test_baseline_gap_scores_scaled_dense_runs_against_their_plain_twins(gp, tmp_path):
    scaled = _write(tmp_path, "scaled.json", [
        _row("sst2", 0.0, 0, 80.0, 1.0, act_scale="layer"), _row("rte", 0.0, 0, 50.0, 1.0, act_scale="layer"),
        _row("sst2", 0.0, 1, 81.0, 1.0, act_scale="layer"), _row("rte", 0.0, 1, 55.0, 1.0, act_scale="layer"),
        _row("sst2", 0.1, 0, 10.0, 0.5, act_scale="layer"),  # DEFT: not a baseline run
        _row("sst2", 0.0, 2, 10.0, 1.0, act_scale="layer"),  # a seed not asked for
    ])
    _write(tmp_path, gp.PLAIN, [
        _row("sst2", 0.0, 0, 82.0, 1.0, act_scale="none"), _row("rte", 0.0, 0, 50.0, 1.0, act_scale="none"),
        _row("sst2", 0.0, 1, 82.0, 1.0, act_scale="none"), _row("rte", 0.0, 1, 52.0, 1.0, act_scale="none"),
        _row("sst2", 0.0, 0, 99.0, 1.0, act_scale="layer"),  # a scaled run in the plain file is no twin
    ])
    g = gp.baseline_gap(gp.Baseline("b", "scales", (scaled,), (0, 1)), root=tmp_path)
    # sst2 -2, -1; rte 0, +3 -> seed means -1, +1: mean 0, SE sd(√2) / √2 = 1
    assert (g["status"], g["pairs"], g["seeds"]) == ("ok", 4, [0, 1])
    assert g["metric_delta"] == pytest.approx(0.0) and g["metric_delta_se"] == pytest.approx(1.0)
    assert g["tasks"] == {"rte": pytest.approx(1.5), "sst2": pytest.approx(-1.5)} and g["methods"] == {"lora": 0.0}
    part = gp.baseline_gap(gp.Baseline("p", "scales", (scaled,), (0, 1, 2)), root=tmp_path)
    assert part["status"] == "incomplete" and part["pairs"] == 4  # seed 2 has no plain twin
    absent = gp.baseline_gap(gp.Baseline("a", "scales", (scaled,), (0, 1, 5)), root=tmp_path)
    assert absent["status"] == "incomplete" and absent["seeds"] == [0, 1]  # seed 5 asked for, no runs at all
    assert gp.baseline_gap(gp.Baseline("m", "?", ("nope.json",), (0,)), root=tmp_path)["status"] == "missing"
    _write(tmp_path, gp.PLAIN, [_row("sst2", 0.0, 0, 82.0, 1.0, act_scale="none")], gpu="A100")
    assert gp.baseline_gap(gp.Baseline("h", "scales", (scaled,), (0, 1)), root=tmp_path)["status"] == "other hardware"


def _same(a, b, path="") -> list[str]:
    """Where two JSON values differ; floats compare to 1e-9 relative (Python versions differ in the
    last bits of ``statistics.fmean``)."""
    if isinstance(a, float) or isinstance(b, float):
        ok = isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
        return [] if ok else [f"{path}: {a!r} != {b!r}"]
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{path}: keys {sorted(set(a) ^ set(b))}"]
        return [d for k in a for d in _same(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} != {len(b)} items"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _same(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def test_same_tolerates_only_the_last_bits():
    assert _same({"x": [1.0, "a"]}, {"x": [1.0 + 1e-15, "a"]}) == []
    assert _same({"x": [1.0]}, {"x": [1.001]}) and _same({"x": 1}, {"y": 1}) and _same(["a"], ["b"])


def test_committed_table_is_the_scripts_output(gp):
    """docs/results/glue_protocols.json must be regenerated whenever a results file changes."""
    committed = read_json(gp.ROOT / gp.R / "glue_protocols.json")
    fresh = json.loads(json.dumps([gp.evaluate(p) for p in gp.PROTOCOLS]))
    assert _same(committed["protocols"], fresh) == []
    assert _same(committed["baselines"], json.loads(json.dumps([gp.baseline_gap(b) for b in gp.BASELINES]))) == []


def test_update_markdown_replaces_only_the_glance_table(gp, tmp_path):
    md = tmp_path / "results.md"
    md.write_text("# title\n| not | this |\n* **At a glance** — text\n\n  | old | table |\n  |---|---|\n  | a | b |\n\n* next\n  | keep |\n")
    gp.update_markdown(md, ["| new |", "|---|"])
    assert md.read_text() == "# title\n| not | this |\n* **At a glance** — text\n\n  | new |\n  |---|\n\n* next\n  | keep |\n"
    for text in ("# no glance here\n  | t |\n", "* **At a glance** — no table\n* next\n  | not this one |\n"):
        md.write_text(text)
        with pytest.raises(ValueError, match="At a glance"):
            gp.update_markdown(md, ["| new |"])
        assert md.read_text() == text  # untouched on error


def test_docs_glance_table_is_the_scripts_output(gp):
    """docs/results.md shows what the committed results files give (fix: run the script with
    ``--update-md docs/results.md``)."""
    docs = (SCRIPT.parents[1] / "docs" / "results.md").read_text(encoding="utf-8").split("\n")
    start, stop = gp.glance_span(docs)
    expected = gp.table_lines([gp.evaluate(p) for p in gp.PROTOCOLS])
    assert [line.removeprefix(gp.INDENT) for line in docs[start:stop]] == expected


def test_rows_whose_density_counted_virtual_tokens_are_flagged(gp, tmp_path):
    old = {"density_counts_virtual_tokens": True}
    f = _write(tmp_path, "v.json", [_row("sst2", 0.0, 0, 70.0, 1.0, "prompt", **old),
                                     _row("sst2", 0.1, 0, 69.0, 0.5, "prompt", **old),
                                     _row("sst2", 0.0, 0, 80.0, 1.0), _row("sst2", 0.1, 0, 79.0, 0.6)])
    r = gp.evaluate(gp.Protocol("v", "α = 0.1", "?", (f,), (0,), 0.1), root=tmp_path)
    assert r["rows_counting_virtual_tokens"] == 2 and gp.table_lines([r])[2].startswith("| α = 0.1 † |")
    clean = _write(tmp_path, "c.json", [_row("sst2", 0.0, 0, 80.0, 1.0), _row("sst2", 0.1, 0, 79.0, 0.6)])
    r = gp.evaluate(gp.Protocol("c", "α = 0.1", "?", (clean,), (0,), 0.1), root=tmp_path)
    assert r["rows_counting_virtual_tokens"] == 0 and gp.table_lines([r])[2].startswith("| α = 0.1 |")
