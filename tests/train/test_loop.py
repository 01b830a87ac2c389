"""The training loop end to end on a tiny model: what trains, what is saved, what reloads."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from tests.conftest import tiny_train_config

from deftune.runs import load_result
from deftune.train import TrainConfig, evaluate_glue, load_run, train_glue
from deftune.train.model import build_model


def test_only_method_and_head_parameters_train(tiny_setup, tmp_path):
    model, _ = build_model(tiny_train_config(tiny_setup, tmp_path, method="lora"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "classifier" in n for n in trainable)


@pytest.mark.parametrize("alpha, options", [(0.0, {}), (1.0, {}), (1.0, {"act_scale": "layer"})])
def test_train_save_reload_same_density(tiny_setup, tmp_path, alpha, options, monkeypatch):
    import deftune.train.loop as loop

    cfg = tiny_train_config(tiny_setup, tmp_path, alpha=alpha, method_options=options, scale_lr=0.5)
    trained = []  # the model train_glue builds and trains

    def capture(*args):
        trained.append(build_model(*args))
        return trained[-1]

    monkeypatch.setattr(loop, "build_model", capture)
    result = train_glue(cfg, progress=False)
    (model, _), = trained
    frozen_before = {n: p for n, p in build_model(cfg)[0].named_parameters() if not p.requires_grad}
    frozen_after = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    assert len(frozen_after) > 10 and frozen_after.keys() == frozen_before.keys()
    assert all(torch.equal(p.cpu(), frozen_before[n]) for n, p in frozen_after.items())  # the frozen base is untouched
    assert result.alpha == alpha and 0 < result.density["exact"] <= 1
    assert set(result.density["per_layer"]) == {"encoder.0", "encoder.1"}
    log = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["alpha"] for r in log] == [alpha] * 4  # same code path for PEFT and DEFT
    assert all(r["density_loss"] > 0 for r in log)

    model, tok, cfg2 = load_run(tmp_path / "run")
    assert cfg2 == cfg
    again = evaluate_glue(model, tok, cfg2)
    assert again.density.overall == pytest.approx(result.density["exact"])
    assert again.metrics[result.metric["name"]] == pytest.approx(result.metric["value"])
    assert load_result(tmp_path / "run").density == result.density
    if options:  # the learned scales moved, were saved, and came back
        from deftune.act_scale import scaled_activations

        scales = [w.log_scale for w in scaled_activations(model).values()]
        assert len(scales) == 2 and all(s.abs().max() > 0 for s in scales)
        assert all(set(r["act_scale"]) == {"encoder.0", "encoder.1"} for r in log)
        assert all(v > 0 for r in log for v in r["act_scale"].values())


def test_regression_head_starts_at_the_label_mean():
    from tests.conftest import tiny_bert

    from deftune.train.model import init_regression_head

    model = tiny_bert(num_labels=1)
    init_regression_head(model, 2.5)
    assert torch.allclose(model.classifier.bias, torch.tensor([2.5]))
    with pytest.raises(ValueError, match="single-output regression head"):
        init_regression_head(tiny_bert(num_labels=2), 2.5)


def test_cli_train_and_evaluate(tiny_setup, tmp_path, capsys):
    from deftune.cli import main

    model_dir, data_dir = tiny_setup
    out = tmp_path / "cli"
    code = main(["train", "--model", str(model_dir), "--data-dir", str(data_dir), "--steps", "2",
                 "--batch-size", "4", "--output-dir", str(out), "--alpha", "0.5"])
    assert code == 0
    assert main(["evaluate", str(out)]) == 0
    text = capsys.readouterr().out
    assert "accuracy" in text and "encoder.1" in text


@pytest.mark.parametrize("argv,needle", [
    (["train", "--alpha=-1"], "alpha must be"),
    (["train", "--eps=-1e-7"], "eps must be"),
    (["train", "--loss", "l7"], "unknown density loss 'l7'"),
    (["train", "--task", "sst9"], "unknown GLUE task"),
    (["train", "--data-dir", "/nonexistent/glue"], "does not exist"),
    (["evaluate", "/nonexistent/run"], "deftune run directory"),
    (["train", "--task", "squad", "--act-threshold-ramp", "5", "--max-length", "96"],
     "--task squad does not use --max-length, --act-threshold-ramp (GLUE options); run `deftune qa-train`"),
])
def test_cli_bad_input_is_one_clear_line(argv, needle, capsys):
    from deftune.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_every_command_has_help(capsys):
    from deftune.cli import build_parser, command_modules

    parser = build_parser()
    for name in command_modules():
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args([name, "--help"])
        assert exit_.value.code == 0
        text = capsys.readouterr().out
        assert "usage: deftune " + name in text
    for action in parser._subparsers._group_actions[0].choices.values():
        for a in action._actions:
            if a.dest not in ("help",) and a.option_strings:
                assert a.help, f"{action.prog} {a.option_strings} has no help"


@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_threshold_route_trains_through_calibrated_zeros_and_reloads(tiny_setup, tmp_path, method):
    from deftune.runs import THRESHOLDS_FILE
    from deftune.sparse import Thresholds, threshold_holders

    options = {"num_virtual_tokens": 4} if method == "prompt" else {}  # virtual tokens: left out of calibration
    dense = train_glue(tiny_train_config(tiny_setup, tmp_path, method=method, method_options=options, alpha=0.0, output_dir=None),
                       progress=False)
    cfg = tiny_train_config(tiny_setup, tmp_path, method=method, method_options=options, alpha=0.0, act_threshold_density=0.5,
                  act_threshold_batches=2)
    assert cfg.run_name == f"sst2-{method}-a0-t0.5"
    result = train_glue(cfg, progress=False)
    saved = Thresholds.load(tmp_path / "run" / THRESHOLDS_FILE)
    assert set(saved.values) == {"encoder.0", "encoder.1"} and all(t > 0 for t in saved.values.values())
    assert saved.target == 0.5
    # calibrated to 0.5 on training batches; the dev density stays near it, far below the dense run's
    assert dense.density["exact"] > 0.9 and 0.3 < result.density["exact"] < 0.7
    log = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert all(r["exact_density"] < 0.8 for r in log)  # the zeros hold during training, not only at eval

    model, tok, cfg2 = load_run(tmp_path / "run")
    assert cfg2 == cfg and len(threshold_holders(model)) == 2
    again = evaluate_glue(model, tok, cfg2)
    assert again.density.overall == pytest.approx(result.density["exact"])
    assert again.metrics[result.metric["name"]] == pytest.approx(result.metric["value"])


def test_threshold_calibration_leaves_the_training_order_alone(tiny_setup, tmp_path):
    # density 1.0: thresholds of 0 change nothing, so the run must equal the dense one exactly
    a = train_glue(tiny_train_config(tiny_setup, tmp_path, alpha=0.0, output_dir=None), progress=False)
    b = train_glue(tiny_train_config(tiny_setup, tmp_path, alpha=0.0, output_dir=None, act_threshold_density=1.0), progress=False)
    assert b.metric == a.metric and b.density == a.density


def test_threshold_ramp_lets_the_zeros_in_step_by_step(tiny_setup, tmp_path):
    """act_threshold_ramp: step s trains at min(1, (s + 1)/ramp) of the calibrated thresholds, so the
    training density falls step by step; evaluation and the saved run use them in full."""
    from deftune.runs import THRESHOLDS_FILE
    from deftune.sparse import Thresholds, threshold_holders

    kw = dict(alpha=0.0, act_threshold_density=0.3, act_threshold_batches=2, steps=6, log_every=1)
    train_glue(tiny_train_config(tiny_setup, tmp_path / "full", **kw), progress=False)
    ramp = train_glue(tiny_train_config(tiny_setup, tmp_path / "ramp", act_threshold_ramp=4, **kw), progress=False)
    logs = {name: [json.loads(x) for x in (tmp_path / name / "run" / "train_log.jsonl").read_text().splitlines()]
            for name in ("full", "ramp")}
    assert [r["threshold_factor"] for r in logs["ramp"]] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
    assert all("threshold_factor" not in r for r in logs["full"])
    density = [r["exact_density"] for r in logs["ramp"]]
    assert density[0] > logs["full"][0]["exact_density"] + 0.1  # a quarter of the thresholds at the first step
    assert all(a >= b for a, b in zip(density[:4], density[1:4]))  # falling as they grow
    saved = Thresholds.load(tmp_path / "ramp" / "run" / THRESHOLDS_FILE)
    assert saved.values == Thresholds.load(tmp_path / "full" / "run" / THRESHOLDS_FILE).values  # same calibration
    model, tok, cfg = load_run(tmp_path / "ramp" / "run")
    assert cfg.act_threshold_ramp == 4
    assert sorted(h.threshold for h in threshold_holders(model)) == sorted(saved.values.values())
    again = evaluate_glue(model, tok, cfg)  # the run's own evaluation used the full thresholds too
    assert again.density.overall == pytest.approx(ramp.density["exact"])


def test_ramped_thresholds_set_each_step_and_restore_on_error():
    from tests.conftest import tiny_bert

    from deftune.sparse import Thresholds, apply_thresholds, ramped_thresholds, threshold_holders

    model = tiny_bert()
    apply_thresholds(model, Thresholds(values={"encoder.0": 0.2, "encoder.1": 0.4}, target=0.5, mode="layer",
                                       achieved={}, natural={}, elements={}))
    holders = threshold_holders(model)
    with pytest.raises(RuntimeError, match="boom"), ramped_thresholds(model, lambda s: (s + 1) / 4, 4) as set_step:
        assert set_step(0) == 0.25
        assert [h.threshold for h in holders] == pytest.approx([0.05, 0.1])
        assert set_step(9) == 1.0 and [h.threshold for h in holders] == pytest.approx([0.2, 0.4])  # past the ramp: in full
        assert set_step(1) == 0.5 and [h.threshold for h in holders] == pytest.approx([0.1, 0.2])
        raise RuntimeError("boom")
    assert [h.threshold for h in holders] == [0.2, 0.4]  # restored


@pytest.mark.parametrize("kw, needle", [
    ({"act_threshold_ramp": 10}, "act_threshold_ramp ramps in the thresholds of act_threshold_density, which is unset"),
    ({"act_threshold_density": 0.5, "act_threshold_ramp": -1}, "act_threshold_ramp must be an integer >= 0"),
    ({"act_threshold_density": 0.5, "act_threshold_ramp": 20, "steps": 10}, "act_threshold_ramp (20) must be <= steps (10)"),
    ({"act_threshold_density": 0.5, "act_threshold_ramp": 1}, "act_threshold_ramp=1 is the same as 0"),
    ({"act_threshold_density": 0.0}, "act_threshold_density must be in (0, 1]"),
    ({"act_threshold_density": 0.5, "act_threshold_mode": "median"}, "act_threshold_mode must be one of"),
    ({"act_threshold_batches": 0}, "act_threshold_batches must be an integer >= 1"),
    ({"steps": True}, "steps must be a positive integer, got True"),
    ({"lr_warmup_steps": 2.5}, "lr_warmup_steps must be an integer >= 0, got 2.5"),
    ({"seed": -1}, "seed must be an integer >= 0, got -1"),
    ({"thresholds": (0.01, -1.0)}, "thresholds (|a| > t densities to report) must be finite and >= 0"),
    ({"density_target": 0.0}, "target must be None or a density in (0, 1], got 0.0"),
    ({"density_target": 0.5, "alpha": 0.0}, "density_target stops the density loss, which alpha=0 turns off"),
])
def test_threshold_options_are_validated(kw, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        TrainConfig(**kw)


def test_density_target_reaches_the_density_loss():
    assert TrainConfig(density_target=0.45).density_config().target == 0.45
    assert TrainConfig().density_config().target is None


@pytest.mark.parametrize("ramp", [0, 2, 10])
def test_threshold_ramps_up_to_the_step_count_are_accepted(ramp):
    assert TrainConfig(act_threshold_density=0.5, act_threshold_ramp=ramp, steps=10).act_threshold_ramp == ramp


def test_density_only_scales_make_the_dense_run_plain_peft(tiny_setup, tmp_path):
    """α = 0 with density-only scales is plain PEFT to the bit; with α > 0 SGD raises the scales."""
    from deftune.act_scale import scaled_activations

    density_only = {"act_scale": "layer", "act_scale_grad": "density"}
    plain = train_glue(tiny_train_config(tiny_setup, tmp_path / "plain", alpha=0.0), progress=False)
    dense = train_glue(tiny_train_config(tiny_setup, tmp_path / "dense", alpha=0.0, method_options=density_only,
                               scale_lr=5.0), progress=False)
    assert dense.metric == plain.metric and dense.density == plain.density
    model, _, _ = load_run(tmp_path / "dense" / "run")
    assert all(not w.log_scale.any() for w in scaled_activations(model).values())  # θ never moved

    deft = train_glue(tiny_train_config(tiny_setup, tmp_path / "deft", alpha=1.0, method_options=density_only,
                              scale_lr=5.0), progress=False)
    model, _, _ = load_run(tmp_path / "deft" / "run")
    assert all((w.log_scale > 0).all() for w in scaled_activations(model).values())
    assert deft.density["exact"] <= plain.density["exact"]


def test_density_only_scales_step_by_sgd_at_scale_lr(tiny_setup, tmp_path):
    from deftune.act_scale import density_only_scales
    from deftune.train.loop import _param_groups, _scale_sgd

    options = {"act_scale": "layer", "act_scale_grad": "density"}
    model, _ = build_model(tiny_train_config(tiny_setup, tmp_path, method_options=options, scale_lr=2.0))
    scales = {id(p) for p in density_only_scales(model)}
    assert len(scales) == 2
    cfg = tiny_train_config(tiny_setup, tmp_path, method_options=options, scale_lr=2.0)
    assert not scales & {id(p) for g in _param_groups(model, cfg, []) for p in g["params"]}  # not AdamW's
    sgd = _scale_sgd(model, cfg)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["lr"] == 2.0
    assert {id(p) for p in sgd.param_groups[0]["params"]} == scales
    with pytest.raises(ValueError, match=r"scale_lr, which is unset: pass scale_lr \(--scale-lr"):
        tiny_train_config(tiny_setup, tmp_path, method_options=options)  # refused where the config enters
    with pytest.raises(ValueError, match="needs the density loss on the activation output"):
        tiny_train_config(tiny_setup, tmp_path, method_options=options, scale_lr=1.0, site="product")
    assert _scale_sgd(build_model(tiny_train_config(tiny_setup, tmp_path, method_options={"act_scale": "layer"}))[0], cfg) is None
    with pytest.raises(ValueError, match="site must be one of"):  # a bad site is named as such first
        tiny_train_config(tiny_setup, tmp_path, method_options=options, scale_lr=1.0, site="nowhere")


def test_density_only_scales_refuse_fp16_before_any_work(tiny_setup, tmp_path, monkeypatch):
    import accelerate

    class Fp16(accelerate.Accelerator):
        mixed_precision = "fp16"  # what `accelerate launch --mixed_precision fp16` gives on a GPU

    monkeypatch.setattr(accelerate, "Accelerator", Fp16)
    monkeypatch.setattr("deftune.train.loop.build_model", lambda *a: pytest.fail("built a model before refusing"))
    cfg = tiny_train_config(tiny_setup, tmp_path, method_options={"act_scale": "layer", "act_scale_grad": "density"}, scale_lr=1.0)
    with pytest.raises(ValueError, match="does not support fp16 mixed precision"):
        train_glue(cfg, progress=False)


def test_train_squad_takes_the_shared_options_without_complaint():
    from deftune.cli import build_parser
    from deftune.cli._args import given_options
    from deftune.cli.train import _unused_by_squad

    def unused(argv):
        return _unused_by_squad(given_options(build_parser().parse_args(argv)))

    assert unused(["train", "--task", "squad"]) == []
    assert unused(["train", "--task", "squad", "--lr", "1e-3", "--seed", "3", "--alpha", "0"]) == []
    assert unused(["train", "--task", "squad", "--head-lr", "0.01"]) == ["--head-lr"]


def test_train_squad_keeps_the_generative_defaults_it_was_not_given(monkeypatch):
    """`deftune train --task squad` must train what `deftune qa-train` trains unless told otherwise:
    TrainConfig's GLUE defaults (alpha 1, 300 steps, batch 32, ...) must not leak into GenConfig."""
    import deftune.generative as gen
    from deftune.cli import build_parser
    from deftune.cli.train import run

    seen = {}

    def fake_train(config):
        seen["config"] = config
        raise SystemExit(0)

    monkeypatch.setattr(gen, "train_generative", fake_train)
    parse = build_parser().parse_args
    with pytest.raises(SystemExit):
        run(parse(["train", "--task", "squad"]))
    assert seen["config"] == gen.GenConfig(model="smollm2")
    with pytest.raises(SystemExit):
        run(parse(["train", "--task", "squad", "--alpha", "0.5", "--steps", "40", "--schedule", "sine"]))
    got = seen["config"]
    assert (got.alpha, got.steps, got.alpha_schedule, got.batch_size) == (0.5, 40, "sine", gen.GenConfig().batch_size)


def test_training_into_a_finished_folder_unmarks_it_until_saved(tiny_setup, tmp_path, monkeypatch):
    """A re-run cut short while saving must not leave the earlier run's results.json (which marks
    a folder finished) beside the new, partly written adapter."""
    from deftune.runs import CONFIG_FILE, RESULTS_FILE

    cfg = tiny_train_config(tiny_setup, tmp_path)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True)
    (out / RESULTS_FILE).write_text('{"stale": true}')
    (out / CONFIG_FILE).write_text('{"stale": true}')

    def crash(*args, **kwargs):
        raise RuntimeError("killed while saving")

    monkeypatch.setattr("deftune.train.loop.save_run", crash)
    with pytest.raises(RuntimeError, match="killed while saving"):
        train_glue(cfg, progress=False)
    assert not (out / RESULTS_FILE).exists() and not (out / CONFIG_FILE).exists()


def test_load_run_names_the_command_for_a_generative_run(tmp_path):
    from deftune.runs import CONFIG_FILE

    (tmp_path / CONFIG_FILE).write_text(json.dumps({"kind": "generative", "config": {}}))
    with pytest.raises(ValueError, match="is a generative run, not a GLUE run: score it with `deftune qa-eval`"):
        load_run(tmp_path)


def test_threshold_calibration_uses_the_runs_site(tiny_setup, tmp_path, monkeypatch):
    """--site product calibrates product-site thresholds (it calibrated the activation output before)."""
    import deftune.train.loop as loop

    seen = {}
    monkeypatch.setattr(loop, "calibrate_thresholds", lambda model, batches, cal, **kw: seen.setdefault("cal", cal))
    cfg = tiny_train_config(tiny_setup, tmp_path, alpha=0.0, site="product", act_threshold_density=0.5)
    model = torch.nn.Linear(2, 2)
    loop.calibrate_on_training_batches(model, [{"input_ids": torch.zeros(1, 2, dtype=torch.long)}], cfg)
    assert seen["cal"].site == "product" and seen["cal"].target == 0.5
