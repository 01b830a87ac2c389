"""Choosing α on held-out training data: the rule on hand-made rows, and a tiny held-out grid end to end."""

from __future__ import annotations

import pytest

from deftune.compare import CompareConfig, load_rows, run_compare, write_compare_report
from deftune.compare.select_alpha import select_alphas, selected_summary


def _row(task, method, alpha, seed, metric, density, split="holdout"):
    row = {"task": task, "method": method, "alpha": alpha, "seed": seed, "steps": 2, "density": density,
           "metric": {"name": "accuracy", "value": metric}, "trainable_parameters": 1, "train_seconds": 1.0}
    if split == "holdout":
        row.update(eval_split="holdout", holdout=100)
    return row


HOLDOUT = [
    # sst2: 0.05 loses 0.5 (ok), 0.1 loses 1.5 (too much) -> 0.05
    _row("sst2", "lora", 0.0, 0, 80.0, 1.0), _row("sst2", "lora", 0.05, 0, 79.5, 0.6), _row("sst2", "lora", 0.1, 0, 78.5, 0.4),
    # rte: both within 1 point (mean over two methods) -> the larger, 0.1
    _row("rte", "lora", 0.0, 0, 60.0, 1.0), _row("rte", "lora", 0.05, 0, 60.0, 0.5), _row("rte", "lora", 0.1, 0, 59.0, 0.3),
    _row("rte", "ia3", 0.0, 0, 58.0, 1.0), _row("rte", "ia3", 0.05, 0, 58.0, 0.5), _row("rte", "ia3", 0.1, 0, 58.0, 0.3),
    # mrpc: neither within 1 point -> the one that loses least (0.1 here)
    _row("mrpc", "lora", 0.0, 0, 70.0, 1.0), _row("mrpc", "lora", 0.05, 0, 67.0, 0.7), _row("mrpc", "lora", 0.1, 0, 68.0, 0.5),
]


def test_largest_alpha_within_tolerance_else_the_least_bad():
    choices = select_alphas(HOLDOUT, tolerance=1.0)
    assert {t: c.alpha for t, c in choices.items()} == {"sst2": 0.05, "rte": 0.1, "mrpc": 0.1}
    assert choices["sst2"].within_tolerance and choices["rte"].within_tolerance
    assert not choices["mrpc"].within_tolerance
    delta, reduction, pairs = choices["rte"].candidates[0.1]
    assert delta == pytest.approx(-0.5) and reduction == pytest.approx(70.0) and pairs == 2
    # a stricter tolerance moves sst2 and rte down to 0.05
    assert {t: c.alpha for t, c in select_alphas(HOLDOUT, tolerance=0.25).items()} == {
        "sst2": 0.05, "rte": 0.05, "mrpc": 0.1}  # sst2 and mrpc: none within 0.25, the α losing least


def test_dev_rows_at_the_chosen_alpha_are_pooled_over_tasks():
    choices = select_alphas(HOLDOUT, tolerance=1.0)
    dev = [
        _row("sst2", "lora", 0.0, 0, 81.0, 1.0, "dev"), _row("sst2", "lora", 0.05, 0, 80.0, 0.5, "dev"),
        _row("sst2", "lora", 0.1, 0, 70.0, 0.1, "dev"),  # not chosen for sst2: left out
        _row("rte", "lora", 0.0, 0, 60.0, 1.0, "dev"), _row("rte", "lora", 0.1, 0, 62.0, 0.3, "dev"),
    ]
    s = selected_summary(dev, choices)
    assert s["overall"]["pairs"] == 2
    assert s["overall"]["metric_delta"] == pytest.approx((-1.0 + 2.0) / 2)
    assert s["overall"]["density_reduction_pct"] == pytest.approx((50.0 + 70.0) / 2)
    with pytest.raises(ValueError, match="no α was chosen for tasks \\['stsb'\\]"):
        selected_summary(dev + [_row("stsb", "lora", 0.0, 0, 1.0, 1.0, "dev")], choices)


def test_choosing_on_dev_rows_needs_other_seeds_than_the_reported_ones():
    dev = [_row("sst2", "lora", 0.0, 0, 80.0, 1.0, "dev"), _row("sst2", "lora", 0.1, 0, 79.0, 0.5, "dev")]
    with pytest.raises(ValueError, match="scored on the dev set: choose α on a grid run with --holdout.*pass report_seeds"):
        select_alphas(dev)  # dev rows and no reported seeds to check them against
    with pytest.raises(ValueError, match="with the reported seeds \\[0\\]"):
        select_alphas(dev, report_seeds={0, 5})
    with pytest.raises(ValueError, match="mix 2 held-out and 2 dev-scored runs"):
        select_alphas(dev + HOLDOUT[:2], report_seeds={5})
    two = dev + [_row("sst2", "lora", 0.05, 0, 79.8, 0.7, "dev")]  # 0.05 loses 0.2, 0.1 loses 1.0
    lenient = select_alphas(two, tolerance=1.5, report_seeds={5, 6})["sst2"]
    assert (lenient.alpha, lenient.within_tolerance) == (0.1, True)
    assert select_alphas(two, tolerance=1.0, report_seeds={5})["sst2"].alpha == 0.1  # the bar itself passes
    strict = select_alphas(two, tolerance=0.5, report_seeds={5, 6})["sst2"]
    assert (strict.alpha, strict.within_tolerance) == (0.05, True)
    none = select_alphas(two, tolerance=0.1, report_seeds={5})["sst2"]
    assert (none.alpha, none.within_tolerance) == (0.05, False)  # the least bad
    # threshold-route rows are not α candidates
    thr = {**_row("sst2", "lora", 0.0, 0, 70.0, 0.5, "dev"), "act_threshold_density": 0.5}
    assert set(select_alphas(two + [thr], tolerance=1.5, report_seeds={5})["sst2"].candidates) == {0.05, 0.1}


def test_runs_missing_at_the_chosen_alpha_are_listed_and_unchosen_tasks_refused():
    from deftune.compare.select_alpha import missing_at_choice, selection_lines

    choices = select_alphas(HOLDOUT, tolerance=1.0)  # sst2 -> 0.05, rte -> 0.1, mrpc -> 0.1
    dev = [_row("sst2", "lora", 0.0, 0, 81.0, 1.0, "dev"), _row("sst2", "lora", 0.05, 0, 80.0, 0.5, "dev"),
           _row("rte", "lora", 0.0, 0, 60.0, 1.0, "dev"), _row("rte", "lora", 0.05, 0, 60.0, 0.5, "dev")]
    assert missing_at_choice(dev, choices) == [("rte", "lora", 0)]  # rte's 0.05 run is not its chosen α
    assert selected_summary(dev, choices)["overall"]["pairs"] == 1
    lines = selection_lines(dev, HOLDOUT, "held.json", 1.0)
    assert lines[-1] == "Not in the average: 1 PEFT runs have no run at their task's chosen α yet (rte lora seed 0)."
    # a reported task that the selection grid never saw: refused through the report path too
    with pytest.raises(ValueError, match="no α was chosen for tasks \\['stsb'\\]"):
        selection_lines(dev + [_row("stsb", "lora", 0.0, 0, 1.0, 1.0, "dev")], HOLDOUT, "held.json", 1.0)


def _grid(tiny_setup, tmp_path, **kw):
    model_dir, data_dir = tiny_setup
    base = dict(model=str(model_dir), tasks=("sst2",), methods=("bitfit",), alphas=(0.0, 1.0), steps=2, train_subset=None,
                batch_size=4, max_length=32, warmup_steps=1, data_dir=str(data_dir), runs_dir=str(tmp_path / "runs"))
    return CompareConfig(**{**base, **kw})


def test_holdout_grid_scores_held_out_training_examples_and_feeds_the_dev_report(tiny_setup, tmp_path):
    held = _grid(tiny_setup, tmp_path, holdout=10, results_json=str(tmp_path / "held.json"),
                 report_md=str(tmp_path / "held.md"))
    assert [c.run_name for c in held.runs()] == ["sst2-bitfit-a0-h10", "sst2-bitfit-a1-h10"]
    rows = run_compare(held, progress=False)
    assert {(r["eval_split"], r["holdout"]) for r in rows} == {("holdout", 10)}
    # the row's metric is the saved model's score on the 10 held-out examples, not on the dev set
    from deftune.train import evaluate_glue, load_run

    model, tokenizer, config = load_run(tmp_path / "runs" / "sst2-bitfit-a0-h10")
    on_held = evaluate_glue(model, tokenizer, config, split="holdout")
    assert on_held.metrics["accuracy"] == pytest.approx(rows[0]["metric"]["value"])
    assert "10 training examples held out of training" in (tmp_path / "held.md").read_text()

    dev = _grid(tiny_setup, tmp_path, results_json=str(tmp_path / "dev.json"), report_md=str(tmp_path / "dev.md"),
                select_alpha_from=str(tmp_path / "held.json"))
    dev_rows = run_compare(dev, progress=False)
    assert all("eval_split" not in r for r in dev_rows)  # dev rows keep the old schema
    report = (tmp_path / "dev.md").read_text()
    assert "## α chosen per task on held-out training data" in report
    assert "## Dev results at the chosen α" in report
    # holdout and dev rows of the same (task, method, α, seed) are different runs, never "done, skipped"
    both = load_rows(tmp_path / "held.json") + dev_rows
    from deftune.compare import run_key

    assert len({run_key(r) for r in both}) == 4
    write_compare_report(dev_rows, dev)  # report-only path works too


def test_report_chooses_on_the_dev_results_of_other_seeds(tiny_setup, tmp_path):
    """Choose on seeds 0 (dev rows, written by hand), report seed 1: the section names the route."""
    choose = [_row("sst2", "bitfit", 0.0, 0, 80.0, 1.0, "dev"), _row("sst2", "bitfit", 1.0, 0, 79.8, 0.5, "dev")]
    from deftune.runs import write_json_atomic

    write_json_atomic(tmp_path / "seed0.json", {"runs": choose})
    grid = _grid(tiny_setup, tmp_path, seeds=(1,), results_json=str(tmp_path / "dev.json"),
                 report_md=str(tmp_path / "dev.md"), select_alpha_from=str(tmp_path / "seed0.json"))
    rows = run_compare(grid, progress=False)
    report = (tmp_path / "dev.md").read_text()
    assert "## α chosen per task on the dev results of other seeds" in report
    assert "dev results of seeds 0, none of them reported here" in report
    assert "| task | selection seeds: α → metric change" in report
    assert "| sst2 | 1 → -0.20 / −50.0% (1) | 1 |" in report  # α = 0 is the baseline, not a candidate
    assert "All 1 pairs" in report.split("## Dev results at the chosen α")[1]
    # the reported seed among the selection seeds: refused, naming the fix
    with pytest.raises(ValueError, match="other seeds than the reported ones"):
        write_compare_report(rows + [{**rows[0], "seed": 0}], grid)


def test_holdout_validation():
    from deftune.cli import build_parser
    from deftune.train import TrainConfig

    args = build_parser().parse_args(["compare", "--holdout", "500", "--select-alpha-from", "held.json",
                                      "--select-tolerance", "0.5"])
    assert (args.holdout, args.select_alpha_from, args.select_tolerance) == (500, "held.json", 0.5)
    assert TrainConfig(holdout=5).eval_split == "holdout" and TrainConfig().eval_split == "dev"
    with pytest.raises(ValueError, match="holdout must be a positive integer or None, got 0"):
        TrainConfig(holdout=0)
    with pytest.raises(ValueError, match="holdout must be a positive integer"):
        CompareConfig(holdout=0)
    with pytest.raises(ValueError, match="holdout applies to GLUE tasks"):
        CompareConfig(tasks=("squad",), methods=("lora",), holdout=10)
    with pytest.raises(ValueError, match="select_tolerance"):
        CompareConfig(select_tolerance=-0.5)
