"""The compare grid's parts on hand-made rows: the report's per-seed means, the pairing summary and
its verdicts, α selection edges, result-file keys and merging, the sweep's rows and plot, and the
atomic writes of deftune.runs."""

from __future__ import annotations

import json
import os

import pytest

from deftune.compare import CompareConfig, load_rows, summarise, write_compare_report
from deftune.compare.grid import _append_row, config_key, run_key
from deftune.compare.pairs import _meets, summary_lines
from deftune.compare.select_alpha import select_alphas, selection_lines


def _row(task, method, alpha, seed, metric, density, **extra):
    return {"task": task, "method": method, "alpha": alpha, "seed": seed, "density": density, "steps": 250,
            "eval_split": "dev", "metric": {"name": "accuracy", "value": metric}, "trainable_parameters": 1,
            "train_seconds": 1.0, **extra}


def _grid(tmp_path, **kw):
    base = dict(tasks=("sst2",), methods=("lora",), alphas=(0.0, 0.1), steps=250, data_dir=str(tmp_path),
                runs_dir=str(tmp_path / "runs"), results_json=str(tmp_path / "glue.json"),
                report_md=str(tmp_path / "results.md"))
    return CompareConfig(**{**base, **kw})


def test_report_rows_average_every_seed(tmp_path):
    rows = [_row("sst2", "lora", 0.0, 0, 80.0, 0.8), _row("sst2", "lora", 0.0, 1, 82.0, 1.0)]
    write_compare_report(rows, _grid(tmp_path, seeds=(0, 1)))
    table = [line for line in (tmp_path / "results.md").read_text().splitlines() if line.startswith("| sst2 | lora | 0 |")]
    assert table == ["| sst2 | lora | 0 | 2 | accuracy | 81.00 | 1.41 | 0.9000 | 1 | 1 |"]


def test_report_reproduce_line_names_the_holdout(tmp_path):
    write_compare_report([], _grid(tmp_path, holdout=50))
    line = next(x for x in (tmp_path / "results.md").read_text().splitlines() if x.startswith("Reproduce"))
    assert " --holdout 50" in line


def test_alphas_come_before_threshold_variants():
    rows = [_row("sst2", "lora", 0.0, 0, 80.0, 1.0), _row("sst2", "lora", 0.1, 0, 79.0, 0.5),
            _row("sst2", "lora", 0.0, 0, 80.0, 0.5, act_threshold_density=0.5)]
    assert list(summarise(rows)) == [0.1, "t0.5"]


def test_the_verdict_is_per_method_signed_and_inclusive_at_the_bar():
    assert _meets({"density_reduction_pct": 40.0, "metric_delta": -1.0})  # both ends of the bar count
    assert not _meets({"density_reduction_pct": 39.9, "metric_delta": 0.0})
    rows = [_row("sst2", "lora", 0.0, 0, 80.0, 1.0), _row("sst2", "lora", 0.1, 0, 80.5, 0.5),  # +0.5, −50 %
            _row("sst2", "ia3", 0.0, 0, 80.0, 1.0), _row("sst2", "ia3", 0.1, 0, 77.0, 0.5)]  # −3, −50 %
    lines = summary_lines("t", summarise(rows)[0.1])
    assert "| lora | 1 | 50.0% | +0.50 | yes |" in lines
    assert "| ia3 | 1 | 50.0% | -3.00 | no |" in lines


def test_alpha_selection_refuses_a_negative_tolerance_and_breaks_ties_low():
    rows = [_row("rte", "lora", 0.0, 0, 60.0, 1.0), _row("rte", "lora", 0.05, 0, 57.0, 0.6),
            _row("rte", "lora", 0.1, 0, 57.0, 0.4)]
    with pytest.raises(ValueError, match="tolerance must be >= 0, got -0.5"):
        select_alphas(rows, tolerance=-0.5, report_seeds={9})
    choice = select_alphas(rows, tolerance=1.0, report_seeds={9})["rte"]  # chosen on seed 0, reported on 9
    assert choice.alpha == 0.05 and not choice.within_tolerance  # both lose 3 points: the smaller α


def test_the_selection_section_lists_only_the_reported_tasks():
    holdout = [_row(t, "lora", a, 5, 60.0 - 10 * a, 1.0 - a) for t in ("sst2", "rte") for a in (0.0, 0.1)]
    dev = [_row("sst2", "lora", a, 0, 80.0, 1.0 - a) for a in (0.0, 0.1)]
    lines = selection_lines(dev, holdout, "sel.json", 1.0)
    assert any(line.startswith("| sst2 |") for line in lines)
    assert not any(line.startswith("| rte |") for line in lines)


def test_a_holdout_runs_key_matches_its_row_so_a_rerun_skips_it(tmp_path):
    (run,) = [c for c in _grid(tmp_path, holdout=5, alphas=(0.1,)).runs()]
    row = _row("sst2", "lora", 0.1, 0, 1.0, 1.0, eval_split="holdout")
    assert config_key(run) == run_key(row)


def test_appending_a_row_replaces_the_row_of_its_key_and_bare_lists_load(tmp_path):
    path = str(tmp_path / "glue.json")
    _append_row(path, _row("sst2", "lora", 0.1, 0, 70.0, 0.5))
    _append_row(path, _row("sst2", "lora", 0.1, 0, 71.0, 0.5))
    assert [r["metric"]["value"] for r in load_rows(path)] == [71.0]
    bare = tmp_path / "old.json"
    bare.write_text(json.dumps([_row("sst2", "lora", 0.1, 0, 70.0, 0.5)]))
    assert len(load_rows(bare)) == 1


@pytest.mark.parametrize("kw, needle", [
    ({"alphas": (-0.1,)}, "alphas must be >= 0"),
    ({"seeds": (-1,)}, "seeds must be one or more integers >= 0"),
    ({"threshold_densities": (0.0,)}, r"threshold_densities must be densities in \(0, 1\]"),
])
def test_compare_config_refuses_bad_values_where_they_enter(tmp_path, kw, needle):
    with pytest.raises(ValueError, match=needle):
        _grid(tmp_path, **kw)


def test_the_sweep_plot_orders_alpha(monkeypatch, tmp_path):
    import deftune.compare.sweep as sweep

    seen = {}

    def capture(fig, path):
        seen["ticks"] = [t.get_text() for t in fig.axes[0].get_xticklabels()]
        seen["metric"] = list(fig.axes[0].lines[0].get_ydata())

    monkeypatch.setattr(sweep, "save_figure", capture)
    sweep.plot_alpha_sweep([_row("sst2", "lora", 0.3, 0, 70.0, 0.5), _row("sst2", "lora", 0.0, 0, 80.0, 1.0)],
                           tmp_path / "p.png")
    assert seen == {"ticks": ["0", "0.3"], "metric": [80.0, 70.0]}


def test_the_sweep_returns_its_own_runs_only(tiny_setup, tmp_path):
    from deftune.compare import AlphaSweepConfig, run_alpha_sweep

    model_dir, data_dir = tiny_setup
    results = tmp_path / "sweep.json"
    other = _row("sst2", "lora", 0.0, 1, 50.0, 1.0, steps=2)  # another seed's row in the same file
    results.write_text(json.dumps({"runs": [other]}))
    cfg = AlphaSweepConfig(task="sst2", method="lora", alphas=(0.0,), steps=2, model=str(model_dir),
                           data_dir=str(data_dir), runs_dir=str(tmp_path / "runs"), results_json=str(results),
                           plot=str(tmp_path / "sweep.png"), seed=0, train_subset=None)
    rows = run_alpha_sweep(cfg, progress=False)
    assert [int(r["seed"]) for r in rows] == [0]
    assert len(load_rows(results)) == 2


def test_atomic_writes_are_world_readable_and_leave_nothing_on_error(tmp_path):
    from deftune.runs import atomic_path, write_json_atomic

    target = tmp_path / "x.json"
    old = os.umask(0o077)  # even under a strict umask: results are meant to be read by others
    try:
        write_json_atomic(target, {"a": 1})
    finally:
        os.umask(old)
    assert target.stat().st_mode & 0o777 == 0o644
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert json.loads(target.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


def test_results_with_fields_from_a_newer_version_still_load():
    from deftune.runs import RunResult

    data = {"name": "r", "task": "sst2", "method": "lora", "alpha": 0.1, "metric": {}, "density": {},
            "train_seconds": 1.0, "added_later": 1}
    assert RunResult.from_dict(data).name == "r"


def test_the_reproduce_line_names_the_runs_the_report_shows(tmp_path):
    """A --report-only call naming fewer α or seeds still reproduces every run in the table."""
    rows = [_row("sst2", "lora", a, s, 80.0, 0.5) for a in (0.0, 0.05, 0.1) for s in (0, 1)]
    rows.append(_row("sst2", "lora", 0.0, 1, 80.0, 0.5, act_threshold_density=0.55))
    write_compare_report(rows, _grid(tmp_path, alphas=(0.0, 0.1), seeds=(0,)))
    line = next(x for x in (tmp_path / "results.md").read_text().splitlines() if x.startswith("Reproduce"))
    assert " --alphas 0,0.05,0.1 --seeds 0,1 --threshold-densities 0.55" in line


@pytest.mark.parametrize("kwargs, match", [({"method": "magic"}, "magic"), ({"act_scale": "row"}, "row"),
                                           ({"alphas": ()}, "alpha")])
def test_alpha_sweep_config_is_checked_where_it_enters(kwargs, match):
    from deftune.compare.sweep import AlphaSweepConfig

    with pytest.raises(ValueError, match=match):
        AlphaSweepConfig(**kwargs)
