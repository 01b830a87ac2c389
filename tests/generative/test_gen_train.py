"""The generative training entry point, its PEFT-method matrix, ReLU-fication and config checks."""

from __future__ import annotations

import json
import math

import pytest
import torch
from gen_helpers import encode_all
from torch import nn

from deftune.generative import GenConfig, relufy, train_generative
from deftune.generative.evaluate import perplexity, teacher_forced_density
from deftune.generative.format import training_batch
from deftune.generative.models import load_generative
from deftune.generative.peft_methods import PEFT_METHODS, apply_peft_method
from deftune.generative.relufy import FATReLU, ShiftedReLU
from deftune.generative.train import train_loop
from deftune.regularizer import DensityRegularizer

TINY = dict(steps=3, batch_size=2, eval_questions=4, ppl_texts=2, max_new_tokens=3, max_length=96,
            max_context_tokens=48, eval_articles=1, eval_batch_size=4, log_every=1, lr=1e-2, prompt_style="plain")


def test_train_generative_writes_a_run(squad_file, tmp_path):
    cfg = GenConfig(model="tiny-llama", alpha=1.0, data_dir=str(squad_file), output_dir=str(tmp_path / "run"), **TINY)
    result = train_generative(cfg)
    run = tmp_path / "run"
    for name in ("deftune.json", "results.json", "predictions.json", "log.json", "adapter/adapter_config.json"):
        assert (run / name).is_file(), name
    saved = json.loads((run / "results.json").read_text())
    assert saved["after"]["questions"] == 4
    assert 0.0 <= saved["after"]["exact_match"] <= 100.0
    assert result.before is not None and result.after.perplexity is not None
    assert [line["step"] for line in result.log] == [1, 2, 3]
    assert all(line["alpha"] == 1.0 and 0 < line["density_loss"] <= 1 for line in result.log)


def test_alpha_zero_runs_the_same_path_and_logs_density(squad_file):
    cfg = GenConfig(model="tiny-t5", alpha=0.0, data_dir=str(squad_file), eval_before=False, **TINY)
    result = train_generative(cfg)
    assert all(line["alpha"] == 0.0 and line["density_loss"] > 0 for line in result.log)
    assert set(result.after.density_teacher_forced["per_stack"]) == {"encoder", "decoder"}
    assert result.after.perplexity is None  # seq2seq: no plain-text perplexity


def test_density_loss_lowers_relu_density(examples):
    """DEFT's l0 on a ReLU model: with alpha > 0 the exact density falls below plain training."""
    densities = {}
    for alpha in (0.0, 5.0):
        model, tok = load_generative("tiny-llama-relu")
        cfg = GenConfig(model="tiny-llama-relu", alpha=alpha, steps=10, batch_size=4, lr=5e-2, lr_warmup_steps=0,
                        max_length=96, max_context_tokens=48, log_every=10)
        model = apply_peft_method(cfg, model)
        items = encode_all(examples, tok, seq2seq=False, max_length=96)
        train_loop(model, items, cfg, tok.pad_token_id)
        densities[alpha] = teacher_forced_density(model, tok, items, batch_size=4).overall
    assert densities[5.0] < densities[0.0] - 0.05, densities


@pytest.mark.parametrize("method", sorted(PEFT_METHODS))
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-t5"])
def test_peft_method_matrix(method, name, examples):
    """Every registered method: only adapter weights train, and DEFT's loss reaches them."""
    model, tok = load_generative(name)
    seq2seq = name == "tiny-t5"
    peft_model = apply_peft_method(GenConfig(model=name, method=method), model)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(("lora" in n or "ia3" in n or "hada" in n or "lokr" in n) for n in trainable)
    batch = training_batch(encode_all(examples[:2], tok, seq2seq), tok.pad_token_id, seq2seq)
    with DensityRegularizer(peft_model, GenConfig(alpha=1.0).density_config()) as reg:
        out = peft_model(**batch)
        loss, parts = reg.total_loss(out.loss * 0.0, step=0)  # the density term alone
    loss.backward()
    assert math.isfinite(parts.total) and parts.density > 0
    grads = [p.grad for p in peft_model.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_fatrelu_and_shifted_relu_hand_computed():
    x = torch.tensor([-1.0, 0.0, 0.05, 0.2, 1.0])
    assert FATReLU(0.1)(x).tolist() == pytest.approx([0.0, 0.0, 0.0, 0.2, 1.0])
    assert FATReLU(0.0)(x).tolist() == pytest.approx([0.0, 0.0, 0.05, 0.2, 1.0])
    assert ShiftedReLU(0.1)(x).tolist() == pytest.approx([0.0, 0.0, 0.0, 0.1, 0.9])


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-t5"])
def test_relufy_swaps_every_activation(name, examples):
    model, tok = load_generative(name)
    seq2seq = name == "tiny-t5"
    items = encode_all(examples[:2], tok, seq2seq)
    before = teacher_forced_density(model, tok, items, batch_size=2).overall
    replaced = relufy(model, "relu")
    assert len(replaced) == (4 if seq2seq else 2)
    assert all(isinstance(model.get_submodule(p), FATReLU) for p in replaced)
    after = teacher_forced_density(model, tok, items, batch_size=2).overall
    if name == "tiny-llama":  # SiLU: no exact zeros before, about half after
        assert before == 1.0 and 0.2 < after < 0.8
    else:  # the tiny GPT-2 and T5 are built with ReLU already: FATReLU(0) is the same function
        assert 0.2 < before < 0.8 and after == before
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        relufy(model, "gelu")


def test_perplexity_matches_the_model_loss():
    model, tok = load_generative("tiny-llama")
    text = "Paris is the capital of France."
    ids = torch.tensor([[tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        expected = math.exp(float(model(input_ids=ids, labels=ids).loss))
    got = perplexity(model, tok, [text, text + " It lies on the Seine."][:1], max_length=64, batch_size=2)
    assert got == pytest.approx(expected, rel=1e-4)
    texts = [text, "Short."]
    padded = perplexity(model, tok, texts, max_length=64, batch_size=2)
    assert padded != pytest.approx(got)  # the second text counts
    assert padded == pytest.approx(perplexity(model, tok, texts, max_length=64, batch_size=1), rel=1e-5)  # padding does not


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("method", "adapterx", "unknown method 'adapterx'"),
        ("relufy", "swish", "unknown relufy activation 'swish'"),
        ("prompt_style", "fancy", "prompt_style must be one of"),
        ("steps", 0, "steps must be an integer >= 1, got 0"),
        ("steps", True, "steps must be an integer >= 1, got True"),
        ("train_subset", 2.5, "train_subset must be None or >= 1, got 2.5"),
        ("lora_dropout", 1.5, "lora_dropout must be in \\[0, 1\\), got 1.5"),
        ("lora_alpha", -4, "lora_alpha must be a finite number >= 0, got -4"),
        ("lr", -1.0, "lr must be a finite number >= 0"),
        ("loss", "l3", "unknown density loss 'l3'"),
        ("max_context_tokens", 300, "max_context_tokens \\(300\\) must be below max_length"),
        ("act_threshold_density", 1.5, "act_threshold_density must be in \\(0, 1\\] or None, got 1.5"),
        ("act_threshold_batches", 0, "act_threshold_batches must be an integer >= 1"),
        ("act_threshold_mode", "median", "act_threshold_mode must be one of \\['energy', 'global', 'layer'\\], got 'median'"),
        ("act_threshold_warmup_steps", 5, "act_threshold_warmup_steps needs act_threshold_density"),
        ("act_threshold_warmup_steps", -1, "act_threshold_warmup_steps must be an integer >= 0, got -1"),
        ("act_threshold_density", True, "act_threshold_density must be in \\(0, 1\\] or None, got True"),
        ("act_threshold_batches", True, "act_threshold_batches must be an integer >= 1, got True"),
    ],
)
def test_config_errors_name_the_bad_value(field, value, message):
    with pytest.raises(ValueError, match=message):
        GenConfig(**{field: value})
    with pytest.raises(ValueError, match="must be below steps \\(200\\)"):
        GenConfig(act_threshold_density=0.5, act_threshold_warmup_steps=200)
    with pytest.raises(ValueError, match="unknown GenConfig field"):
        GenConfig.from_dict({"alpha_typo": 1})


def test_saved_run_reloads_with_the_same_answers(squad_file, tmp_path):
    from deftune.cli import main
    from deftune.generative.train import evaluate_generative_run, load_generative_run

    cfg = GenConfig(model="tiny-llama", relufy="relu", alpha=1.0, data_dir=str(squad_file),
                    output_dir=str(tmp_path / "run"), eval_before=False, **TINY)
    result = train_generative(cfg)
    again = evaluate_generative_run(tmp_path / "run")
    assert again.predictions == result.after.predictions
    assert again.density_teacher_forced["overall"] == pytest.approx(result.after.density_teacher_forced["overall"])
    assert main(["qa-eval", str(tmp_path / "run"), "--json", str(tmp_path / "eval.json")]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["questions"] == 4
    # overrides reach the config before the model is placed (qa-eval --device cuda on a CPU run)
    fewer = evaluate_generative_run(tmp_path / "run", eval_questions=2, device="cpu")
    assert fewer.questions == 2
    _, _, cfg_over = load_generative_run(tmp_path / "run", eval_questions=2)
    assert cfg_over.eval_questions == 2 and cfg_over.seed == cfg.seed
    with pytest.raises(ValueError, match="unknown GenConfig field"):
        load_generative_run(tmp_path / "run", eval_question=2)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU; use device='cpu'"):
            load_generative_run(tmp_path / "run", device="cuda")
    with pytest.raises(FileNotFoundError, match="not a generative run folder"):
        evaluate_generative_run(tmp_path)


def test_calibrated_thresholds_make_exact_zeros_and_survive_reload(squad_file, tmp_path):
    """A SiLU model has no exact zeros; thresholds calibrated to 0.5 give ~0.5 exact density in
    training, in the teacher-forced pass and in generation, and the saved run reloads with them."""
    from deftune.generative.train import THRESHOLDS_FILE, evaluate_generative_run, load_generative_run
    from deftune.sparse.thresholds import ThresholdedActivation

    plain = GenConfig(model="tiny-llama", data_dir=str(squad_file), eval_before=False, **TINY)
    base = train_generative(plain)
    assert base.after.density_teacher_forced["overall"] > 0.99
    cfg = GenConfig(model="tiny-llama", act_threshold_density=0.5, act_threshold_batches=2, data_dir=str(squad_file),
                    output_dir=str(tmp_path / "run"), eval_before=False, **TINY)
    result = train_generative(cfg)
    assert result.thresholds is not None and all(t > 0 for t in result.thresholds.values.values())
    assert 0.3 < result.after.density_teacher_forced["overall"] < 0.7
    assert 0.3 < result.log[0]["train_density"] < 0.7
    assert (tmp_path / "run" / THRESHOLDS_FILE).is_file()
    again = evaluate_generative_run(tmp_path / "run")
    assert again.predictions == result.after.predictions
    assert again.density_teacher_forced["overall"] == pytest.approx(result.after.density_teacher_forced["overall"])
    model, _, _ = load_generative_run(tmp_path / "run")
    assert sum(isinstance(m, ThresholdedActivation) for m in model.modules()) == model.config.num_hidden_layers


def test_threshold_mode_reaches_the_calibration(squad_file):
    """``act_threshold_mode`` is handed to the calibration: the saved thresholds carry it and the
    overall density lands near the target, with layers allowed to differ."""
    cfg = GenConfig(model="tiny-llama", act_threshold_density=0.5, act_threshold_mode="energy", act_threshold_batches=2,
                    data_dir=str(squad_file), eval_before=False, **TINY)
    result = train_generative(cfg)
    assert result.thresholds is not None and result.thresholds.mode == "energy"
    assert result.thresholds.overall_achieved == pytest.approx(0.5, abs=0.05)
    assert 0.3 < result.after.density_teacher_forced["overall"] < 0.7


def test_product_site_thresholds_train_measure_and_reload(squad_file, tmp_path):
    """``site="product"``: thresholds on the down projection's input (act(gate) * up), applied to
    the LoRA-adapted model; density is measured at that site and survives a reload."""
    from deftune.generative.train import evaluate_generative_run, load_generative_run
    from deftune.sparse.thresholds import InputThreshold, threshold_holders

    cfg = GenConfig(model="tiny-llama", site="product", act_threshold_density=0.5, act_threshold_batches=2,
                    data_dir=str(squad_file), output_dir=str(tmp_path / "run"), eval_before=False, **TINY)
    result = train_generative(cfg)
    assert result.thresholds is not None and result.thresholds.site == "product"
    assert 0.3 < result.log[0]["train_density"] < 0.7
    assert 0.3 < result.after.density_teacher_forced["overall"] < 0.7
    again = evaluate_generative_run(tmp_path / "run")
    assert again.predictions == result.after.predictions
    assert again.density_teacher_forced["overall"] == pytest.approx(result.after.density_teacher_forced["overall"])
    model, _, _ = load_generative_run(tmp_path / "run")
    holders = threshold_holders(model)
    assert len(holders) == model.config.num_hidden_layers and all(isinstance(h, InputThreshold) for h in holders)
    # qa-eval measures another site on request: the activated gate of the same run stays dense
    from deftune.cli import main

    assert main(["qa-eval", str(tmp_path / "run"), "--site", "act", "--json", str(tmp_path / "act.json")]) == 0
    assert json.loads((tmp_path / "act.json").read_text())["density_teacher_forced"] > 0.99


def test_threshold_warmup_ramps_the_thresholds_and_ends_at_the_calibrated_ones(squad_file):
    """With a 2-step ramp the first step trains at threshold 0 (dense), the second at sin(π/4)·t,
    and from step 2 on — and in evaluation — at the calibrated t."""
    cfg = GenConfig(model="tiny-llama", act_threshold_density=0.5, act_threshold_batches=2, act_threshold_warmup_steps=2,
                    data_dir=str(squad_file), eval_before=False, **TINY)
    result = train_generative(cfg)
    scales = [line["threshold_scale"] for line in result.log]
    assert scales == pytest.approx([0.0, math.sin(math.pi / 4), 1.0])
    assert result.log[0]["train_density"] > 0.99  # threshold 0: SiLU has no exact zeros
    assert 0.3 < result.log[2]["train_density"] < 0.7
    assert 0.3 < result.after.density_teacher_forced["overall"] < 0.7


def test_threshold_ramp_restores_the_calibrated_thresholds_when_training_raises():
    from deftune.generative.train import threshold_ramp
    from deftune.sparse.thresholds import ThresholdedActivation

    model = nn.Sequential(ThresholdedActivation(nn.SiLU(), 0.2), ThresholdedActivation(nn.SiLU(), 0.4))
    with pytest.raises(RuntimeError, match="boom"), threshold_ramp(model, 10) as set_step:
        assert set_step(5) == pytest.approx(math.sin(math.pi / 4))
        assert [m.threshold for m in model] == pytest.approx([0.2 * math.sin(math.pi / 4), 0.4 * math.sin(math.pi / 4)])
        raise RuntimeError("boom")
    assert [m.threshold for m in model] == [0.2, 0.4]


def test_calibrated_thresholds_on_an_encoder_decoder(squad_file):
    """The tiny ReLU T5 is about half dense on its own: thresholds calibrated to 0.25 must take it
    well below the same run without them."""
    plain = train_generative(GenConfig(model="tiny-t5", data_dir=str(squad_file), eval_before=False, **TINY))
    cfg = GenConfig(model="tiny-t5", act_threshold_density=0.25, act_threshold_batches=2, data_dir=str(squad_file),
                    eval_before=False, **TINY)
    result = train_generative(cfg)
    assert result.thresholds is not None and len(result.thresholds.values) > 0
    dense, sparse = (r.after.density_teacher_forced["overall"] for r in (plain, result))
    assert sparse < dense - 0.1 and sparse < 0.4, (dense, sparse)


@pytest.mark.parametrize(("kw", "message"), [
    ({"method": "ia3", "lora_dropout": 0.1}, "lora_dropout applies to lora and dora; method 'ia3'"),
    ({"method": "loha", "lora_dropout": 0.1}, "method 'loha' would ignore lora_dropout=0.1"),
    ({"method": "ia3", "target_modules": "q_proj"}, "would ignore target_modules='q_proj'"),
])
def test_options_a_method_would_ignore_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        GenConfig(**kw)
    GenConfig(method="dora", lora_dropout=0.1, target_modules="q_proj")  # lora-family methods use both


def test_a_run_whose_questions_do_not_fit_names_max_length(squad_file):
    from deftune.data.glue import DataError

    cfg = GenConfig(model="tiny-llama", data_dir=str(squad_file), **{**TINY, "max_length": 12, "max_context_tokens": 4})
    with pytest.raises(DataError, match="max_length=12"):
        train_generative(cfg)


def test_logged_lr_is_the_rate_of_its_step(examples):
    model, tok = load_generative("tiny-llama")
    cfg = GenConfig(model="tiny-llama", alpha=0.0, steps=3, batch_size=2, lr=0.3, lr_warmup_steps=3, log_every=1,
                    max_length=96, max_context_tokens=48)
    model = apply_peft_method(cfg, model)
    log = train_loop(model, encode_all(examples, tok, seq2seq=False, max_length=96), cfg, tok.pad_token_id)
    assert [line["lr"] for line in log] == pytest.approx([0.1, 0.2, 0.3])  # warm-up (s + 1) / 3


def test_retraining_a_folder_clears_the_old_run(squad_file, tmp_path, monkeypatch):
    """A ``full`` run trained where a LoRA run was leaves no adapter behind, cannot be reloaded, and
    writes results.json last."""
    from deftune.generative import train as gen_train
    from deftune.generative.train import load_generative_run

    run = tmp_path / "run"
    train_generative(GenConfig(model="tiny-llama", data_dir=str(squad_file), output_dir=str(run), eval_before=False,
                               **TINY))
    assert (run / "adapter").is_dir()
    written = []
    real = gen_train.write_json_atomic
    monkeypatch.setattr(gen_train, "write_json_atomic", lambda path, data: (written.append(path.name), real(path, data)))
    train_generative(GenConfig(model="tiny-llama", method="full", data_dir=str(squad_file), output_dir=str(run),
                               eval_before=False, **TINY))
    assert not (run / "adapter").exists() and written[-1] == "results.json"
    with pytest.raises(ValueError, match="full fine-tuning run: it saves no weights"):
        load_generative_run(run)


def test_a_saved_run_keeps_what_it_measured_and_its_relu_threshold(squad_file, tmp_path):
    """FATReLU at 0.5 with gradient accumulation: the reload replays the threshold, results.json
    carries the per-layer density, and the time per step is per optimizer step."""
    from deftune.generative.train import load_generative_run

    cfg = GenConfig(model="tiny-llama", relufy="fatrelu", relu_threshold=0.5, grad_accum=2, alpha=1.0,
                    data_dir=str(squad_file), output_dir=str(tmp_path / "run"), eval_before=False, **TINY)
    result = train_generative(cfg)
    assert result.seconds_per_step == pytest.approx(result.train_seconds / cfg.steps)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["after_density_per_layer"] == result.after.density_teacher_forced["per_layer"]
    model, _, _ = load_generative_run(tmp_path / "run")
    acts = [m for m in model.modules() if isinstance(m, FATReLU)]
    assert acts and all(m.threshold == 0.5 for m in acts)
