"""compare / alpha sweep: resumable grids of runs, atomic results, reports."""

from __future__ import annotations

import json

import pytest

from deftune.compare import (
    AlphaSweepConfig,
    CompareConfig,
    load_rows,
    run_alpha_sweep,
    run_compare,
    summarise,
    write_compare_report,
)
from deftune.compare.grid import METHOD_LR


def _grid(tiny_setup, tmp_path, **kw):
    model_dir, data_dir = tiny_setup
    base = dict(model=str(model_dir), tasks=("sst2",), methods=("lora", "bitfit"), alphas=(0.0, 1.0), steps=2, train_subset=None,
                batch_size=4, max_length=32, warmup_steps=1, data_dir=str(data_dir),
                runs_dir=str(tmp_path / "runs"), results_json=str(tmp_path / "glue.json"),
                report_md=str(tmp_path / "results.md"))
    base.update(kw)
    return CompareConfig(**base)


def test_compare_writes_rows_report_and_resumes(tiny_setup, tmp_path, capsys):
    cfg = _grid(tiny_setup, tmp_path)
    rows = run_compare(cfg, progress=False)
    assert len(rows) == 4
    for r in rows:
        assert set(r) >= {"task", "method", "alpha", "metric", "density", "per_layer_density",
                          "trainable_parameters", "train_seconds"}
    stored = json.loads((tmp_path / "glue.json").read_text())
    assert len(stored["runs"]) == 4 and "hardware" in stored
    report = (tmp_path / "results.md").read_text()
    assert "| sst2 | bitfit | 1 | 1 |" in report and "## α = 1: DEFT vs PEFT" in report
    assert (tmp_path / "img" / "results_metric_vs_density.png").stat().st_size > 0
    summary = summarise(rows)
    assert set(summary) == {1.0} and set(summary[1.0]["methods"]) == {"lora", "bitfit"}
    assert {r["act_scale"] for r in rows} == {"layer"}  # the DEFT recipe's scales, in PEFT runs too

    # a hand-written summary under the title and notes below the marker survive a rewrite of the report
    from deftune.compare import NOTES_MARKER, SUMMARY_MARKERS, write_compare_report

    (tmp_path / "results.md").write_text(report + NOTES_MARKER + "\nmy notes\n")
    write_compare_report(rows, cfg)
    with_notes = (tmp_path / "results.md").read_text()
    assert with_notes.endswith(NOTES_MARKER + "\nmy notes\n")
    title, rest = with_notes.split("\n", 1)
    summary_block = SUMMARY_MARKERS[0] + "\nthe verdict\n" + SUMMARY_MARKERS[1]
    (tmp_path / "results.md").write_text(title + "\n\n" + summary_block + "\n" + rest)
    write_compare_report(rows, cfg)
    rewritten = (tmp_path / "results.md").read_text()
    assert rewritten.startswith(title + "\n\n" + summary_block + "\n\n") and rewritten.count("the verdict") == 1
    assert rewritten.replace(summary_block + "\n\n", "") == with_notes
    # an unclosed summary is refused, not dropped
    unclosed = title + "\n\n" + SUMMARY_MARKERS[0] + "\nthe verdict\n" + rest
    (tmp_path / "results.md").write_text(unclosed)
    with pytest.raises(ValueError, match="not closed by <!-- /summary -->"):
        write_compare_report(rows, cfg)
    assert (tmp_path / "results.md").read_text() == unclosed
    (tmp_path / "results.md").write_text(rewritten)

    # a half-written run directory (interrupted) is restarted; finished runs are skipped
    (tmp_path / "runs" / "sst2-lora-a3").mkdir(parents=True)
    (tmp_path / "runs" / "sst2-lora-a3" / "junk").write_text("partial")
    capsys.readouterr()
    rows2 = run_compare(_grid(tiny_setup, tmp_path, alphas=(0.0, 1.0, 3.0), methods=("lora",)), progress=False)
    out = capsys.readouterr().out
    assert out.count("done, skipped") == 2 and "sst2-lora-a3: training" in out
    assert not (tmp_path / "runs" / "sst2-lora-a3" / "junk").exists()
    assert len(rows2) == 5 and len(load_rows(tmp_path / "glue.json")) == 5


def test_alpha_sweep_plot(tiny_setup, tmp_path):
    model_dir, data_dir = tiny_setup
    cfg = AlphaSweepConfig(model=str(model_dir), alphas=(0.0, 2.0), steps=2, train_subset=None, warmup_steps=1, data_dir=str(data_dir),
                           runs_dir=str(tmp_path / "runs"), results_json=str(tmp_path / "sweep.json"),
                           plot=str(tmp_path / "sweep.png"))
    rows = run_alpha_sweep(cfg, progress=False)
    assert sorted(r["alpha"] for r in rows) == [0.0, 2.0]
    assert (tmp_path / "sweep.png").stat().st_size > 0


def _row(task, method, alpha, seed, metric, density):
    return {"task": task, "method": method, "alpha": alpha, "seed": seed, "density": density,
            "metric": {"name": "accuracy", "value": metric}, "trainable_parameters": 1, "train_seconds": 1.0}


def test_summarise_pairs_runs_of_the_same_seed_and_averages():
    rows = [
        _row("sst2", "lora", 0.0, 0, 80.0, 1.0), _row("sst2", "lora", 0.1, 0, 79.0, 0.5),  # -1.0, 50%
        _row("sst2", "lora", 0.0, 1, 82.0, 0.8), _row("sst2", "lora", 0.1, 1, 82.0, 0.6),  # 0.0, 25%
        _row("rte", "lora", 0.1, 2, 50.0, 0.1),  # no PEFT run for seed 2: not a pair
    ]
    s = summarise(rows)[0.1]
    assert s["overall"]["pairs"] == 2
    assert abs(s["overall"]["metric_delta"] - (-0.5)) < 1e-9
    assert abs(s["overall"]["density_reduction_pct"] - 37.5) < 1e-9
    assert set(s["seeds"]) == {0, 1} and abs(s["seeds"][0]["metric_delta"] + 1.0) < 1e-9
    assert abs(s["overall"]["metric_delta_seed_sd"] - 2**0.5 / 2) < 1e-9
    assert abs(s["overall"]["metric_delta_se"] - 0.5) < 1e-9  # sd / sqrt(2 seeds)
    from deftune.compare.pairs import summary_lines

    overall = summary_lines("t", s)[-1]  # sd of the seed means 0.71, standard error 0.71 / sqrt(2) = 0.50
    assert "sd of the seed means 0.71 points; standard error of the mean over 2 seeds 0.50 points)" in overall
    one_seed = summarise(rows[:2])[0.1]
    assert summary_lines("t", one_seed)[-1].endswith("(sd of the seed means 0.00 points).")


def test_seeds_run_separately_and_validate(tiny_setup, tmp_path):
    cfg = _grid(tiny_setup, tmp_path, methods=("bitfit",), alphas=(0.0,), seeds=(0, 3))
    names = [c.run_name for c in cfg.runs()]
    assert names == ["sst2-bitfit-a0", "sst2-bitfit-a0-s3"] and [c.seed for c in cfg.runs()] == [0, 3]

    with pytest.raises(ValueError, match="seeds"):
        _grid(tiny_setup, tmp_path, seeds=())


def test_cli_parses_seeds_as_integers_and_alphas_as_floats():
    from deftune.cli import build_parser

    args = build_parser().parse_args(["compare", "--seeds", "0,2", "--alphas", "0,0.075"])
    assert args.seeds == (0, 2) and all(type(s) is int for s in args.seeds)
    assert args.alphas == (0.0, 0.075)


def test_workers_share_a_grid_claimed_runs_are_passed_over_and_rows_merge(tiny_setup, tmp_path, monkeypatch, capsys):
    """Two workers on one grid: a run another worker holds is passed over, and a row another worker
    appended while this one trained survives this worker's write."""
    from deftune import compare
    from deftune.runs import file_lock, write_json_atomic

    cfg = _grid(tiny_setup, tmp_path, methods=("bitfit",))
    runs = cfg.runs()
    assert [c.run_name for c in runs] == ["sst2-bitfit-a0", "sst2-bitfit-a1"]
    foreign = {"task": "rte", "method": "lora", "alpha": 0.0, "steps": 2, "seed": 0, "density": 1.0, "act_scale": "layer",
               "metric": {"name": "accuracy", "value": 50.0}, "trainable_parameters": 1, "train_seconds": 1.0}

    def fake_row(config, *, progress):  # "another worker" appends while this run trains
        present = compare.load_rows(cfg.results_json)
        if foreign not in present:
            write_json_atomic(cfg.results_json, {"runs": present + [foreign]})
        return {**foreign, "task": config.task, "method": config.method, "alpha": config.alpha}

    monkeypatch.setitem(compare.ROW_BUILDERS, compare.TrainConfig, fake_row)
    from pathlib import Path

    with file_lock(Path(cfg.runs_dir) / ".locks" / "sst2-bitfit-a0.lock") as held:  # the other worker trains sst2-bitfit-a0
        assert held
        rows = compare.run_grid(runs, cfg.results_json, progress=False)
    out = capsys.readouterr().out
    assert "sst2-bitfit-a0: training in another worker, passed over" in out and "sst2-bitfit-a1: training" in out
    assert sorted((r["task"], r["alpha"]) for r in rows) == [("rte", 0.0), ("sst2", 1.0)]
    assert sorted((r["task"], r["alpha"]) for r in load_rows(cfg.results_json)) == [("rte", 0.0), ("sst2", 1.0)]
    # once released, the run is trained; the finished one is skipped
    rows = compare.run_grid(runs, cfg.results_json, progress=False)
    assert "sst2-bitfit-a1: done, skipped" in capsys.readouterr().out
    assert len(rows) == 3


def test_compare_threshold_route_is_its_own_variant(tiny_setup, tmp_path):
    from deftune.compare import config_key, run_key

    cfg = _grid(tiny_setup, tmp_path, methods=("lora",), alphas=(0.0,), threshold_densities=(0.5,))
    names = [c.run_name for c in cfg.runs()]
    assert names == ["sst2-lora-a0", "sst2-lora-a0-t0.5"]
    assert len({config_key(c) for c in cfg.runs()}) == 2  # same α, different key
    rows = run_compare(cfg, progress=False)
    assert len(rows) == 2 and {r.get("act_threshold_density") for r in rows} == {None, 0.5}
    assert {config_key(c) for c in cfg.runs()} == {run_key(r) for r in rows}
    summary = summarise(rows)
    assert set(summary) == {"t0.5"}  # compared with the dense PEFT run, not pooled with it
    dense, thr = sorted(rows, key=lambda r: r.get("act_threshold_density") or 0)
    assert summary["t0.5"]["overall"]["density_reduction_pct"] == 100 * (dense["density"] - thr["density"]) / dense["density"]
    assert summary["t0.5"]["overall"]["density_reduction_pct"] > 20
    report = (tmp_path / "results.md").read_text()
    assert "| sst2 | lora | 0 + thresholds 0.5 | 1 |" in report
    assert "## α = 0, thresholds at density 0.5: threshold route vs PEFT" in report and "--threshold-densities 0.5" in report


def test_compare_rejects_bad_threshold_densities(tiny_setup, tmp_path):
    with pytest.raises(ValueError, match="threshold_densities must be densities in"):
        _grid(tiny_setup, tmp_path, threshold_densities=(1.5,))


def test_report_reproduce_line_names_every_changed_budget_flag(tiny_setup, tmp_path):
    from deftune.compare import write_compare_report

    cfg = _grid(tiny_setup, tmp_path, steps=3, warmup_steps=2)
    write_compare_report([], cfg)
    line = next(x for x in (tmp_path / "results.md").read_text().splitlines() if x.startswith("Reproduce"))
    assert "--steps 3" in line and "--warmup-steps 2" in line and "--batch-size 4" in line


def test_method_lr_and_options_are_recorded_and_a_results_file_keeps_one_recipe(tiny_setup, tmp_path, capsys):
    from deftune.runs import write_json_atomic

    opts = {"prompt": {"prompt_init": "vocab", "num_virtual_tokens": 4}}
    cfg = _grid(tiny_setup, tmp_path, methods=("prompt",), alphas=(0.0,), method_lr={"prompt": 0.1}, method_options=opts)
    (row,) = run_compare(cfg, progress=False)
    assert row["lr"] == 0.1 and row["method_options"] == {"prompt_init": "vocab", "num_virtual_tokens": 4}
    report = (tmp_path / "results.md").read_text()
    assert "prompt lr 0.1, prompt prompt_init=vocab" in report
    assert "--method-lr prompt=0.1 --method-options prompt.prompt_init=vocab,prompt.num_virtual_tokens=4" in report
    # the same key under another recipe is refused before anything trains; the row is kept
    with pytest.raises(ValueError, match="trained with .* results file of its own"):
        run_compare(_grid(tiny_setup, tmp_path, methods=("prompt",), alphas=(0.0,), method_lr={"prompt": 0.3},
                          method_options=opts), progress=False)
    assert load_rows(cfg.results_json) == [row]
    # rows written before recipes were recorded ran at METHOD_LR with default options; an option
    # spelled out at its default value is the same recipe
    old = {**row, "method": "bitfit"}
    del old["lr"], old["method_options"]
    write_json_atomic(cfg.results_json, {"runs": [old]})
    default = _grid(tiny_setup, tmp_path, methods=("bitfit",), alphas=(0.0,), method_options={"bitfit": {"task_type": None}})
    capsys.readouterr()
    assert run_compare(default, progress=False) == [old] and "done, skipped" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"'lr': 0.005.*'lr': 0.02"):
        run_compare(_grid(tiny_setup, tmp_path, methods=("bitfit",), alphas=(0.0,), method_lr={"bitfit": 0.02}),
                    progress=False)


def test_a_grid_with_tuple_options_resumes_its_own_file(tiny_setup, tmp_path, capsys):
    """Rows store tuples as JSON lists; the recipe check compares them as equal."""
    cfg = _grid(tiny_setup, tmp_path, methods=("lora",), alphas=(0.0,),
                method_options={"lora": {"target_modules": ("query", "value"), "r": 2}})
    (row,) = run_compare(cfg, progress=False)
    assert row["method_options"] == {"target_modules": ["query", "value"], "r": 2}
    capsys.readouterr()
    assert run_compare(cfg, progress=False) == [row] and "done, skipped" in capsys.readouterr().out
    with pytest.raises(ValueError, match="results file of its own"):  # another act_scale is another recipe
        run_compare(_grid(tiny_setup, tmp_path, methods=("lora",), alphas=(0.0,), act_scale="none",
                          method_options={"lora": {"target_modules": ("query", "value"), "r": 2}}), progress=False)


def test_report_refuses_a_file_with_two_recipes_under_one_key(tiny_setup, tmp_path):
    from deftune.compare import write_compare_report

    row = {"task": "sst2", "method": "prompt", "alpha": 0.0, "steps": 2, "seed": 0, "density": 1.0,
           "metric": {"name": "accuracy", "value": 50.0}, "trainable_parameters": 1, "train_seconds": 1.0}
    with pytest.raises(ValueError, match="two runs under one key .* split the file per recipe"):
        write_compare_report([row, {**row, "lr": 0.3}], _grid(tiny_setup, tmp_path))


def test_peft_act_scale_gives_the_dense_runs_their_own_scales(tiny_setup, tmp_path, capsys):
    """peft_act_scale="none": DEFT keeps its learned scales, the α = 0 baseline is plain PEFT; the
    rows record it, a rerun resumes, the report says so and reproduces it."""
    cfg = _grid(tiny_setup, tmp_path, methods=("lora",), alphas=(0.0, 1.0), threshold_densities=(0.5,),
                peft_act_scale="none")
    rows = run_compare(cfg, progress=False)
    scales = {(r["alpha"], r.get("act_threshold_density")): r["act_scale"] for r in rows}
    assert scales == {(0.0, None): "none", (1.0, None): "layer", (0.0, 0.5): "layer"}
    capsys.readouterr()
    assert run_compare(cfg, progress=False) == rows and "done, skipped" in capsys.readouterr().out
    text = (tmp_path / "results.md").read_text()
    assert "the dense PEFT runs: no learned activation scales (`peft_act_scale=none`)" in text
    assert "in PEFT and DEFT runs alike" not in text and "--peft-act-scale none" in text
    with pytest.raises(ValueError, match="results file of its own"):  # the scaled baseline is another recipe
        run_compare(_grid(tiny_setup, tmp_path, methods=("lora",), alphas=(0.0,)), progress=False)
    for bad in ("relu", "None"):
        with pytest.raises(ValueError, match=r"peft_act_scale must be one of \['none', 'layer', 'neuron'\]"):
            _grid(tiny_setup, tmp_path, peft_act_scale=bad)
    with pytest.raises(ValueError, match=r"act_scale must be one of .* got 'global'"):
        _grid(tiny_setup, tmp_path, act_scale="global")
    with pytest.raises(ValueError, match="this grid has none .* add 0 to --alphas"):
        _grid(tiny_setup, tmp_path, alphas=(0.1,), peft_act_scale="none")


def test_peft_act_scale_the_other_way_round_is_the_no_scale_threshold_grid(tiny_setup, tmp_path):
    """act_scale="none", peft_act_scale="layer": scaled PEFT twins, everything else without scales
    (the recipe of docs/results/glue_thresholds_noscale.json)."""
    cfg = _grid(tiny_setup, tmp_path, methods=("bitfit",), alphas=(0.0,), threshold_densities=(0.5,),
                act_scale="none", peft_act_scale="layer")
    rows = run_compare(cfg, progress=False)
    assert {r.get("act_threshold_density"): r["act_scale"] for r in rows} == {None: "layer", 0.5: "none"}
    text = (tmp_path / "results.md").read_text()
    assert ("no learned activation scales (`act_scale=none`, in the DEFT and threshold runs); the dense PEFT runs: "
            "learned activation scales `peft_act_scale=layer` (lr 0.1)") in text


def test_threshold_ramp_rides_on_the_threshold_runs_only(tiny_setup, tmp_path, capsys):
    cfg = _grid(tiny_setup, tmp_path, methods=("bitfit",), alphas=(0.0,), threshold_densities=(0.5,),
                threshold_ramp=2, act_scale="none")
    rows = run_compare(cfg, progress=False)
    assert {r.get("act_threshold_density"): r.get("act_threshold_ramp") for r in rows} == {None: None, 0.5: 2}
    capsys.readouterr()
    assert run_compare(cfg, progress=False) == rows and "done, skipped" in capsys.readouterr().out
    text = (tmp_path / "results.md").read_text()
    assert "the threshold runs ramp their thresholds in over the first 2 steps" in text and "--threshold-ramp 2" in text
    with pytest.raises(ValueError, match="results file of its own"):  # thresholds in full: another recipe
        run_compare(_grid(tiny_setup, tmp_path, methods=("bitfit",), alphas=(0.0,), threshold_densities=(0.5,),
                          act_scale="none"), progress=False)
    for kw, needle in [({"threshold_ramp": 2}, "this grid has none"),
                       ({"threshold_ramp": -1, "threshold_densities": (0.5,)}, "threshold_ramp must be an integer >= 0"),
                       ({"threshold_ramp": 99, "threshold_densities": (0.5,)}, r"threshold_ramp \(99\) must be <= steps"),
                       ({"threshold_ramp": 1, "threshold_densities": (0.5,)}, "threshold_ramp=1 is the same as 0")]:
        with pytest.raises(ValueError, match=needle):
            _grid(tiny_setup, tmp_path, **kw)


def test_density_target_rides_on_the_deft_runs_only(tiny_setup, tmp_path, capsys):
    cfg = _grid(tiny_setup, tmp_path, methods=("bitfit",), alphas=(0.0, 1.0), density_target=0.5)
    assert {c.alpha: c.density_target for c in cfg.runs()} == {0.0: None, 1.0: 0.5}
    rows = run_compare(cfg, progress=False)
    assert {r["alpha"]: r.get("density_target") for r in rows} == {0.0: None, 1.0: 0.5}
    capsys.readouterr()
    assert run_compare(cfg, progress=False) == rows and "done, skipped" in capsys.readouterr().out
    text = (tmp_path / "results.md").read_text()
    assert "stops at density target 0.5 per layer" in text and "--density-target 0.5" in text
    with pytest.raises(ValueError, match="results file of its own"):  # the paper's loss: another recipe
        run_compare(_grid(tiny_setup, tmp_path, methods=("bitfit",), alphas=(0.0, 1.0)), progress=False)
    for kw, needle in [({"density_target": 0.5, "alphas": (0.0,)}, "this grid has none"),
                       ({"density_target": 1.5}, r"target must be None or a density in \(0, 1\], got 1.5"),
                       ({"density_target": 0.5, "tasks": ("sst2", "squad"), "methods": ("lora",)}, "applies to GLUE runs"),
                       ({"density_target": 0.5, "tasks": ("squad",), "methods": ("lora",), "train_subset": 8000,
                         "batch_size": 32, "max_length": 128, "warmup_steps": 100}, "--density-target apply to GLUE")]:
        with pytest.raises(ValueError, match=needle):
            _grid(tiny_setup, tmp_path, **kw)


def test_scale_grad_density_rides_on_the_scaled_runs_only(tiny_setup, tmp_path, capsys):
    """scale_grad="density" with plain PEFT twins: the DEFT rows record act_scale_grad, the dense
    rows are plain PEFT; a rerun resumes; the report names it; another scale_grad is another recipe."""
    cfg = _grid(tiny_setup, tmp_path, methods=("lora",), alphas=(0.0, 1.0), peft_act_scale="none",
                scale_grad="density", scale_lr=2.0)
    rows = run_compare(cfg, progress=False)
    options = {r["alpha"]: (r["act_scale"], r.get("method_options", {}).get("act_scale_grad")) for r in rows}
    assert options == {0.0: ("none", None), 1.0: ("layer", "density")}
    capsys.readouterr()
    assert run_compare(cfg, progress=False) == rows and "done, skipped" in capsys.readouterr().out
    text = (tmp_path / "results.md").read_text()
    assert "moved by the density loss only (`scale_grad=density`, SGD lr 2, in the DEFT runs)" in text
    assert "--scale-grad density" in text and "--scale-lr 2.0" in text
    with pytest.raises(ValueError, match="results file of its own"):
        run_compare(_grid(tiny_setup, tmp_path, methods=("lora",), alphas=(0.0, 1.0), peft_act_scale="none",
                          scale_lr=2.0), progress=False)
    # the scales' learning rate is part of the recipe (the SGD step of this mode): rows record it
    assert {r["alpha"]: r.get("scale_lr") for r in rows} == {0.0: None, 1.0: 2.0}
    other_lr = _grid(tiny_setup, tmp_path, methods=("lora",), alphas=(0.0, 1.0), peft_act_scale="none",
                     scale_grad="density", scale_lr=3.0)
    with pytest.raises(ValueError, match=r"'scale_lr': 2.0.*'scale_lr': 3.0"):
        run_compare(other_lr, progress=False)
    # a report is rewritten only by a command that describes its runs
    from deftune.compare import report_compare

    before = (tmp_path / "results.md").read_text()
    with pytest.raises(ValueError, match=r"'scale_lr': 2.0.*'scale_lr': 3.0"):
        report_compare(other_lr)
    assert (tmp_path / "results.md").read_text() == before
    assert report_compare(cfg) == rows
    with pytest.raises(ValueError, match=r"scale_grad must be one of \['all', 'density'\], got 'task'"):
        _grid(tiny_setup, tmp_path, scale_grad="task")
    with pytest.raises(ValueError, match="needs learned scales"):
        _grid(tiny_setup, tmp_path, scale_grad="density", act_scale="none")


@pytest.mark.parametrize("act_scale, says", [
    ("layer", "learned activation scales `act_scale=layer` (lr 0.1, in PEFT and DEFT runs alike)"),
    ("none", "no learned activation scales (`act_scale=none`, in PEFT and DEFT runs alike)"),
])
def test_report_names_the_activation_scales(tiny_setup, tmp_path, act_scale, says):
    from deftune.compare import write_compare_report

    row = {"task": "sst2", "method": "lora", "alpha": 0.0, "steps": 2, "seed": 0, "density": 1.0, "act_scale": act_scale,
           "metric": {"name": "accuracy", "value": 50.0}, "trainable_parameters": 1, "train_seconds": 1.0}
    cfg = _grid(tiny_setup, tmp_path, act_scale=act_scale)
    write_compare_report([row], cfg)
    text = (tmp_path / "results.md").read_text()
    assert says in text
    # a baseline with learned scales is flagged as weaker than plain PEFT; a plain one is not
    assert ("Baseline: the dense PEFT runs here carry learned activation scales (`act_scale=layer`)" in text) == (
        act_scale == "layer")
    # scales that only the density loss moves stay at 1 in a dense run: plain PEFT, no warning
    write_compare_report([{**row, "method_options": {"act_scale_grad": "density"}}], cfg)
    assert "Baseline:" not in (tmp_path / "results.md").read_text()


@pytest.mark.parametrize("kw, match", [
    ({"method_lr": {"lorra": 0.1}}, "method_lr names unknown method 'lorra'"),
    ({"method_lr": {"lora": 0.0}}, r"method_lr\['lora'\] must be a learning rate > 0, got 0.0"),
    ({"method_options": {"lora": {"prompt_init": "vocab"}}}, "prompt_init='vocab' does not apply to method 'lora'"),
    ({"method_options": {"lorra": {}}}, "method_options names unknown method 'lorra'"),
    ({"method_lr": {"prompt": 0.1}}, r"name methods \['prompt'\] that this grid does not run"),
    ({"tasks": ("squad",), "methods": ("lora",), "method_lr": {"lora": 0.1}}, "apply to GLUE runs"),
])
def test_method_lr_and_options_are_validated(tiny_setup, tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        _grid(tiny_setup, tmp_path, **kw)


def test_cli_parses_method_options_per_method():
    from deftune.cli import build_parser

    args = build_parser().parse_args(["compare", "--method-options", "prompt.prompt_init=vocab,prefix.prefix_projection=true",
                                      "--method-lr", "prompt=0.1"])
    assert args.method_options == {"prompt": {"prompt_init": "vocab"}, "prefix": {"prefix_projection": True}}
    assert args.method_lr == {"prompt": 0.1}
    from deftune.compare.grid import format_method_options

    again = build_parser().parse_args(["compare", "--method-options", format_method_options(args.method_options)])
    assert again.method_options == args.method_options  # the report's Reproduce line parses back
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compare", "--method-options", "prompt_init=vocab"])
    assert build_parser().parse_args(["compare", "--peft-act-scale", "none"]).peft_act_scale == "none"
    assert build_parser().parse_args(["compare"]).peft_act_scale is None  # as act_scale


def test_head_and_scale_lr_are_recorded_and_old_rows_ran_at_the_defaults(tiny_setup, tmp_path, capsys):
    from deftune.runs import write_json_atomic

    cfg = _grid(tiny_setup, tmp_path, methods=("bitfit",), alphas=(0.0,))
    (row,) = run_compare(cfg, progress=False)
    assert (row["head_lr"], row["scale_lr"], row["act_scale"]) == (cfg.head_lr, cfg.scale_lr, "layer")
    with pytest.raises(ValueError, match=r"'head_lr': 0.005.*'head_lr': 0.01"):
        run_compare(_grid(tiny_setup, tmp_path, methods=("bitfit",), alphas=(0.0,), head_lr=0.01), progress=False)
    # rows written before these were recorded ran at CompareConfig's defaults
    old = {k: v for k, v in row.items() if k not in ("head_lr", "scale_lr")}
    write_json_atomic(cfg.results_json, {"runs": [old]})
    capsys.readouterr()
    assert run_compare(cfg, progress=False) == [old] and "done, skipped" in capsys.readouterr().out
    with pytest.raises(ValueError, match="results file of its own"):
        run_compare(_grid(tiny_setup, tmp_path, methods=("bitfit",), alphas=(0.0,), scale_lr=0.01), progress=False)
    # without learned scales the scale learning rate plays no part
    plain = _grid(tiny_setup, tmp_path, methods=("bitfit",), alphas=(0.0,), act_scale="none",
                  results_json=str(tmp_path / "plain.json"))
    (p,) = run_compare(plain, progress=False)
    assert "scale_lr" not in p
    again = _grid(tiny_setup, tmp_path, methods=("bitfit",), alphas=(0.0,), act_scale="none", scale_lr=5.0,
                  results_json=str(tmp_path / "plain.json"))
    assert run_compare(again, progress=False) == [p]


def test_grid_settings_are_recorded_and_a_rerun_with_others_is_refused(tiny_setup, tmp_path, capsys):
    """Model, subsets, batch size, length and α schedule are in each row: a run of the same key with
    other settings is not taken for done (its report would describe runs it did not make)."""
    from deftune.compare.grid import SETTINGS
    from deftune.runs import write_json_atomic

    cfg = _grid(tiny_setup, tmp_path, methods=("bitfit",), alphas=(0.0,))
    (row,) = run_compare(cfg, progress=False)
    assert {k: row[k] for k in SETTINGS} == {k: getattr(cfg, k) for k in SETTINGS}
    for change in ({"train_subset": 64}, {"eval_subset": 8}, {"max_length": 16}, {"model": str(tmp_path)}):
        with pytest.raises(ValueError, match=f"{next(iter(change))} .*this grid.*results file of its own"):
            run_compare(_grid(tiny_setup, tmp_path, methods=("bitfit",), alphas=(0.0,), **change), progress=False)
    # rows written before the settings were recorded are not checked on them
    old = {k: v for k, v in row.items() if k not in SETTINGS}
    write_json_atomic(cfg.results_json, {"runs": [old]})
    capsys.readouterr()
    again = _grid(tiny_setup, tmp_path, methods=("bitfit",), alphas=(0.0,), eval_subset=8)
    assert run_compare(again, progress=False) == [old] and "done, skipped" in capsys.readouterr().out


def test_grids_with_their_own_results_files_get_their_own_run_folders():
    a = CompareConfig(results_json="docs/results/glue_a.json")
    b = CompareConfig(results_json="docs/results/glue_b.json")
    assert str(a.run_root).startswith("runs/compare/glue_a-") and a.run_root != b.run_root
    assert str(CompareConfig(runs_dir="runs/x", results_json="docs/results/glue_a.json").run_root) == "runs/x"
    (first, *_) = a.runs()
    assert first.output_dir.startswith(f"{a.run_root}/")
    # results files of one name in two folders: two run folders (one would overwrite the other's runs)
    other = CompareConfig(results_json="elsewhere/glue_a.json")
    assert other.run_root != a.run_root and other.run_root.name.startswith("glue_a-")
    assert CompareConfig(results_json="docs/results/glue_a.json").run_root == a.run_root  # stable


def test_a_squad_only_grid_refuses_glue_options_it_would_drop():
    from deftune.compare import CompareConfig

    with pytest.raises(ValueError, match="--schedule, --warmup-steps apply to GLUE runs and this grid runs squad only"):
        CompareConfig(tasks=("squad",), methods=("lora",), schedule="sine", warmup_steps=7)


def test_a_results_file_holds_one_step_budget_and_eval_split(tiny_setup, tmp_path):
    """Pairs and report rows are keyed by task, method, variant and seed: a grid at another step
    count or on held-out data must not be appended to a file (nor trained into its run folders)."""
    from deftune.compare import check_recipes
    from deftune.runs import write_json_atomic

    cfg = _grid(tiny_setup, tmp_path, methods=("lora",), alphas=(0.0,))
    row = {"task": "sst2", "method": "lora", "alpha": 0.0, "steps": 2, "seed": 0, "lr": METHOD_LR["lora"],
           "head_lr": cfg.head_lr, "act_scale": cfg.act_scale, "scale_lr": cfg.scale_lr,
           "metric": {"name": "accuracy", "value": 50.0}, "density": 0.9}
    write_json_atomic(cfg.results_json, {"runs": [row]})
    check_recipes(cfg.runs(), cfg.results_json)  # same budget: fine
    for other in (_grid(tiny_setup, tmp_path, methods=("lora",), alphas=(0.0,), steps=3),
                  _grid(tiny_setup, tmp_path, methods=("lora",), alphas=(0.0,), holdout=10)):
        with pytest.raises(ValueError, match=r"holds GLUE runs of \(steps, eval split, holdout\) \(2, 'dev', None\)"):
            check_recipes(other.runs(), cfg.results_json)
    write_json_atomic(cfg.results_json, {"runs": [row, {**row, "steps": 3}]})
    with pytest.raises(ValueError, match="mixes GLUE runs of several"):
        write_compare_report(load_rows(cfg.results_json), cfg)


def test_missing_input_files_are_named_before_any_work(tiny_setup, tmp_path):
    from deftune.compare import report_compare

    with pytest.raises(FileNotFoundError, match="--report-only rewrites the report of an existing results file"):
        report_compare(_grid(tiny_setup, tmp_path, results_json=str(tmp_path / "typo.json")))
    assert not (tmp_path / "results.md").exists()
    with pytest.raises(FileNotFoundError, match="check --select-alpha-from"):
        _grid(tiny_setup, tmp_path, select_alpha_from=str(tmp_path / "nope.json"))


def test_optional_numbers_take_none_on_the_command_line():
    """The report's Reproduce line writes `--head-lr None` for a head trained at the method's rate."""
    from deftune.cli import build_parser

    args = build_parser().parse_args(["compare", "--train-subset", "None", "--head-lr", "none"])
    assert (args.train_subset, args.head_lr) == (None, None)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compare", "--steps", "none"])  # not optional


def test_density_change_signs():
    from deftune.compare.pairs import density_change

    assert (density_change(44.24), density_change(-5.0), density_change(0.0)) == ("−44.2", "+5.0", "−0.0")


def test_new_prompt_runs_are_not_mixed_with_rows_that_counted_virtual_tokens(tiny_setup, tmp_path, capsys):
    from deftune.runs import write_json_atomic

    opts = {"prompt": {"num_virtual_tokens": 4}}
    cfg = _grid(tiny_setup, tmp_path, methods=("prompt",), alphas=(0.0,), method_options=opts)
    (row,) = run_compare(cfg, progress=False)
    assert row["virtual_tokens"] == 4 and "density_with_virtual_tokens" in row
    old = {k: v for k, v in row.items() if k not in ("virtual_tokens", "density_with_virtual_tokens")}
    write_json_atomic(cfg.results_json, {"runs": [old]})
    assert run_compare(cfg, progress=False) == [old]  # nothing to train: the stored rows are reported
    more = _grid(tiny_setup, tmp_path, methods=("prompt",), alphas=(0.0, 1.0), method_options=opts)
    with pytest.raises(ValueError, match="counted the virtual tokens.*results file of its own"):
        run_compare(more, progress=False)
