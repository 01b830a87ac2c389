"""Each command's flags reach the config it builds: the library function is replaced by a stub that
records what it was given (the commands' own work is tested elsewhere)."""

from __future__ import annotations

import json
import types

import pytest

from deftune.cli import build_parser, main


class _Stop(Exception):
    pass


def _capture(monkeypatch, module, name):
    """Replace ``module.name`` by a stub that records its arguments and stops the command."""
    seen = {}

    def stub(*args, **kwargs):
        seen["args"], seen["kwargs"] = args, kwargs
        raise _Stop

    monkeypatch.setattr(module, name, stub)
    return seen


def test_parse_mapping_keeps_integers_integers():
    from deftune.cli._args import parse_mapping

    out = parse_mapping("a=8,b=0.5,c=true,d=text")
    assert out == {"a": 8, "b": 0.5, "c": True, "d": "text"} and type(out["a"]) is int


def test_qa_train_maps_relufy_none_and_writes_its_summary(monkeypatch, tmp_path):
    import deftune.generative as gen

    seen = {}

    class Result:
        def summary(self):
            return {"after": {"f1": 1.0}}

    def stub(cfg):
        seen["cfg"] = cfg
        return Result()

    monkeypatch.setattr(gen, "train_generative", stub)
    out = tmp_path / "s.json"
    assert main(["qa-train", "--model", "tiny-llama", "--relufy", "none", "--json", str(out)]) == 0
    assert seen["cfg"].relufy is None
    assert json.loads(out.read_text()) == {"after": {"f1": 1.0}}


def test_qa_eval_passes_its_overrides(monkeypatch):
    import deftune.generative.train as gt

    seen = _capture(monkeypatch, gt, "evaluate_generative_run")
    with pytest.raises(_Stop):
        main(["qa-eval", "runs/x", "--data-dir", "d", "--eval-questions", "3", "--site", "product"])
    assert seen["args"] == ("runs/x",)
    assert seen["kwargs"] == {"data_dir": "d", "eval_questions": 3, "site": "product"}


def test_train_squad_routes_warmup_and_weight_decay(monkeypatch):
    import deftune.generative as gen

    seen = _capture(monkeypatch, gen, "train_generative")
    with pytest.raises(_Stop):
        main(["train", "--task", "squad", "--warmup-steps", "7", "--weight-decay", "0.1"])
    cfg = seen["args"][0]
    assert cfg.alpha_warmup_steps == 7 and cfg.lr_warmup_steps == 10 and cfg.weight_decay == 0.1


def test_train_squad_passes_typed_options_even_at_glue_defaults(monkeypatch):
    """`--alpha 1 --steps 300 --batch-size 32` equal TrainConfig's defaults: typed, they must still
    reach GenConfig (whose defaults are α 0, 200 steps, batch 8); untyped ones keep GenConfig's."""
    import deftune.generative as gen
    from deftune.generative import GenConfig

    seen = _capture(monkeypatch, gen, "train_generative")
    with pytest.raises(_Stop):
        main(["train", "--task", "squad", "--model", "tiny-llama", "--alpha", "1", "--steps", "300",
              "--batch-size", "32", "--log-every", "25"])
    cfg, default = seen["args"][0], GenConfig()
    assert (cfg.model, cfg.alpha, cfg.steps, cfg.batch_size, cfg.log_every) == ("tiny-llama", 1.0, 300, 32, 25)
    assert (cfg.lr_warmup_steps, cfg.lr, cfg.output_dir) == (default.lr_warmup_steps, default.lr, None)
    with pytest.raises(_Stop):
        main(["train", "--task", "squad"])
    assert seen["args"][0].model == "smollm2" and seen["args"][0].alpha == default.alpha


def test_train_squad_refuses_glue_options_even_at_their_defaults(capsys):
    assert main(["train", "--task", "squad", "--head-lr", "none"]) == 2
    assert "does not use --head-lr" in capsys.readouterr().err


def test_generative_models_refuse_encoder_only_models(tmp_path):
    from transformers import BertConfig

    from deftune.generative.models import load_generative

    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="encoder-only 'bert'.*smollm2"):
        load_generative(str(tmp_path))


def test_measure_passes_count_padding(monkeypatch, tiny_setup):
    import deftune.density as density

    seen = _capture(monkeypatch, density, "measure_density")
    model_dir, data_dir = tiny_setup
    with pytest.raises(_Stop):
        main(["measure", "--task", "sst2", "--model", str(model_dir), "--data-dir", str(data_dir), "--count-padding",
              "--limit", "4"])
    assert seen["kwargs"]["count_padding"] is True and seen["kwargs"]["count_virtual_tokens"] is False
    with pytest.raises(_Stop):
        main(["measure", "--task", "sst2", "--model", str(model_dir), "--data-dir", str(data_dir),
              "--count-virtual-tokens", "--limit", "4"])
    assert seen["kwargs"]["count_padding"] is False and seen["kwargs"]["count_virtual_tokens"] is True


def test_skip_parses_stacks(monkeypatch):
    import deftune.ada.pipeline as pipeline

    seen = _capture(monkeypatch, pipeline, "skip_run")
    with pytest.raises(_Stop):
        main(["skip", "runs/x", "--stacks", "encoder", "--policy", "gate"])
    assert seen["args"][0].skip.stacks == ("encoder",)


def test_sweep_plot_none_means_no_plot(monkeypatch):
    import deftune.compress.sweep as sweep

    seen = _capture(monkeypatch, sweep, "quant_sweep")
    with pytest.raises(_Stop):
        main(["sweep", "quant", "--run-dir", "runs/x", "--plot", "none"])
    assert seen["args"][0].plot is None


@pytest.mark.parametrize("argv, key, default", [
    (["calibrate", "--model", "minilm"], "refine_passes", 2),
    (["compress", "runs/x", "--pattern", "int4"], "calib_size", 128),
])
def test_documented_defaults(argv, key, default):
    assert getattr(build_parser().parse_args(argv), key) == default


def test_calibrate_saves_the_first_models_thresholds(monkeypatch, tmp_path):
    """With two models and --output, the file holds the first model's thresholds."""
    import deftune.calibration_study as cal

    saved = []

    class Th:
        def __init__(self, name):
            self.name = name

        def table(self):
            return ""

        def save(self, path):
            saved.append(self.name)

    setups = {}

    def setup(job, model_name):
        setups[model_name] = True
        return types.SimpleNamespace(model=model_name, calib=[], skip_leading=0, evaluate=None, metric="m",
                                     data_info={})

    import deftune.sparse.calibrate as sc

    monkeypatch.setattr(cal, "_setup", setup)
    monkeypatch.setattr(sc, "collect_histograms", lambda *a, **k: None)
    monkeypatch.setattr(sc, "calibrate_thresholds", lambda model, *a, **k: Th(model))
    cal.run_calibration(cal.CalibrationJob(models=("m1", "m2"), output=str(tmp_path / "th.json")))
    assert saved == ["m1"] and list(setups) == ["m1", "m2"]


def test_measure_of_a_run_reads_the_runs_task_and_data(monkeypatch, tmp_path):
    import deftune.data.glue as glue
    import deftune.train as train

    cfg = types.SimpleNamespace(task="rte", data_dir=str(tmp_path / "glue"), holdout=None)
    monkeypatch.setattr(train, "load_run", lambda run_dir: (None, None, cfg))
    seen = _capture(monkeypatch, glue, "load_glue")
    with pytest.raises(_Stop):
        main(["measure", "--run-dir", str(tmp_path)])
    task, split, data_dir = seen["args"]
    assert (task.name, split, data_dir) == ("rte", "dev", cfg.data_dir)
    with pytest.raises(_Stop):
        main(["measure", "--run-dir", str(tmp_path), "--task", "mrpc", "--data-dir", "x"])
    assert (seen["args"][0].name, seen["args"][2]) == ("mrpc", "x")
    # --split holdout: the training examples the run held out (read from its training split)
    assert main(["measure", "--run-dir", str(tmp_path), "--split", "holdout"]) == 2  # trained without --holdout
    cfg.holdout = 5
    with pytest.raises(_Stop):
        main(["measure", "--run-dir", str(tmp_path), "--split", "holdout"])
    assert seen["args"][1] == "train"


@pytest.mark.parametrize("flags", [["--batch-size", "0"], ["--limit", "-5"], ["--thresholds", "abc"],
                                   ["--thresholds", "-1"]])
def test_measure_checks_its_numbers_by_flag(flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["measure", *flags])
    assert exit_info.value.code == 2 and flags[0] in capsys.readouterr().err


def test_train_refuses_a_finished_run_folder_unless_told(tmp_path, capsys, monkeypatch):
    import deftune.train as train

    (tmp_path / "results.json").write_text("{}")
    assert main(["train", "--output-dir", str(tmp_path)]) == 2
    assert "--overwrite" in capsys.readouterr().err and (tmp_path / "results.json").exists()
    seen = _capture(monkeypatch, train, "train_glue")
    with pytest.raises(_Stop):
        main(["train", "--output-dir", str(tmp_path), "--overwrite"])
    assert seen["args"][0].output_dir == str(tmp_path)


def test_interrupts_and_os_errors_end_in_one_line(monkeypatch, capsys):
    import deftune.train as train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "train_glue", interrupted)
    assert main(["train"]) == 130 and "interrupted" in capsys.readouterr().err

    def unreachable(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(train, "train_glue", unreachable)
    assert main(["train"]) == 2
    assert "minilm, minilm-relu, smollm2" in capsys.readouterr().err


@pytest.mark.parametrize("flags, needle", [(["--alphas", ""], "alphas must hold"), (["--tasks", ""], "tasks must"),
                                           (["--steps", "-1"], "steps must be a positive integer"),
                                           (["--method-options", "lora.name=dora"], "may not set 'name'")])
def test_compare_refuses_empty_grids_and_bad_steps_by_name(flags, needle, tmp_path, capsys):
    argv = ["compare", "--tasks", "rte", "--methods", "lora", "--results-json", str(tmp_path / "r.json"),
            "--report-md", str(tmp_path / "r.md"), *flags]
    assert main(argv) == 2
    assert needle in capsys.readouterr().err and not (tmp_path / "r.json").exists()


def test_compare_checks_that_its_results_can_be_written_before_training(tmp_path, capsys, monkeypatch):
    import deftune.compare.grid as grid

    blocked = tmp_path / "file"
    blocked.write_text("")
    seen = _capture(monkeypatch, grid, "_glue_row")
    assert main(["compare", "--tasks", "rte", "--methods", "lora", "--alphas", "0",
                 "--results-json", str(blocked / "r.json"), "--report-md", str(tmp_path / "r.md")]) == 2
    assert "cannot create the folder" in capsys.readouterr().err and not seen


def test_train_method_options_are_checked_by_name(capsys):
    assert main(["train", "--method-options", "bogus=1"]) == 2
    assert "unknown MethodConfig keys ['bogus']" in capsys.readouterr().err


def test_compare_checks_every_task_folder_before_training(tmp_path, capsys, monkeypatch):
    import deftune.compare.grid as grid

    glue = tmp_path / "glue"
    (glue / "SST-2").mkdir(parents=True)
    for name in ("train.tsv", "dev.tsv"):
        (glue / "SST-2" / name).write_text("sentence\tlabel\n")
    seen = _capture(monkeypatch, grid, "_glue_row")
    argv = ["compare", "--methods", "lora", "--alphas", "0", "--data-dir", str(glue),
            "--results-json", str(tmp_path / "r.json"), "--report-md", str(tmp_path / "r.md")]
    assert main([*argv, "--tasks", "sst2,rte"]) == 2
    assert "RTE" in capsys.readouterr().err and not seen
    (glue / "SST-2" / "dev.tsv").unlink()
    assert main([*argv, "--tasks", "sst2"]) == 2
    assert "dev.tsv" in capsys.readouterr().err and not seen


def test_a_missing_model_folder_names_the_known_models(tmp_path, capsys):
    assert main(["measure", "--model", str(tmp_path / "nowhere")]) == 2
    assert "not found; known names: ['minilm', 'minilm-relu', 'smollm2']" in capsys.readouterr().err
