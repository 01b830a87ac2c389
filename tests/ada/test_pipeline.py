"""End to end on a tiny local model: train_glue + AdaExtension -> `deftune skip` -> reload."""

from __future__ import annotations

import json

import pytest
import torch


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 2-step ADA-DEFT run of a tiny random BERT on a 40-row SST-2-format folder."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    from deftune.ada import AdaConfig, AdaExtension
    from deftune.train import TrainConfig, train_glue

    root = tmp_path_factory.mktemp("ada_run")
    words = ["good", "bad", "film", "great", "awful", "plot", "fun", "dull"]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    model_dir = root / "model"
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(model_dir)
    torch.manual_seed(0)
    BertForSequenceClassification(
        BertConfig(
            vocab_size=len(vocab),
            hidden_size=16,
            num_hidden_layers=3,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=64,
            initializer_range=0.5,  # large weights: the MLP blocks (and their gates) move the logits
        )
    ).save_pretrained(model_dir)
    glue = root / "glue" / "SST-2"
    glue.mkdir(parents=True)
    rows = [
        f"{words[i % 8]} {words[(3 * i) % 8]} film\t{int(words[i % 8] in ('good', 'great', 'fun'))}"
        for i in range(40)
    ]
    for split in ("train", "dev"):
        (glue / f"{split}.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    cfg = TrainConfig(
        task="sst2",
        model=str(model_dir),
        method="lora",
        alpha=1.0,
        steps=2,
        batch_size=8,
        max_length=16,
        eval_batch_size=16,
        data_dir=str(root / "glue"),
        lr_warmup_steps=0,
        output_dir=str(root / "run"),
        log_every=1,
        method_options={"target_modules": ["query", "value"]},
    )
    ext = AdaExtension(AdaConfig(gate="sigmoid", init=0.5, density_weighting="uniform"))
    result = train_glue(cfg, extensions=[ext], progress=False)
    return root / "run", result, ext.gate_values()


def test_skip_cli_reports_before_and_after_and_saves(tiny_run, capsys):
    from deftune.ada import load_gates, load_skipped
    from deftune.cli import main

    run_dir, result, gates = tiny_run
    saved_gates = load_gates(run_dir)
    assert saved_gates == pytest.approx(gates)
    code = main(["skip", str(run_dir), "--policy", "topk", "--keep", "2", "--score", "gate"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    # the unskipped model is the trained (gated) model: same metric as the run reported
    assert summary["before"] == pytest.approx(result.metric["value"], abs=0.01)
    assert summary["skipped"].startswith("1/3")
    on_disk = json.loads((run_dir / "skipped" / "skip_result.json").read_text())
    assert on_disk["param_bytes_after"] < on_disk["param_bytes_before"]
    model, plan = load_skipped(run_dir / "skipped")
    assert plan.skip == on_disk["skipped"]
    assert sum(p.numel() * p.element_size() for p in model.parameters()) == on_disk["param_bytes_after"]


def test_skip_cli_rejects_a_bad_policy(tiny_run, capsys):
    from deftune.cli import main

    run_dir, _, _ = tiny_run
    assert main(["skip", str(run_dir), "--policy", "fastest"]) == 2
    assert "unknown skip policy 'fastest'" in capsys.readouterr().err


def test_density_policy_needs_no_gates(tiny_run, capsys):
    from deftune.cli import main

    run_dir, _, _ = tiny_run
    code = main(
        [
            "skip",
            str(run_dir),
            "--policy",
            "density",
            "--tau-density",
            "1.0",
            "--density-threshold",
            "0.01",
            "--save",
            "false",
            "--density-examples",
            "16",
        ]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["saved"] is None


def test_skip_run_config_refuses_a_density_policy_without_examples(tmp_path):
    """Caught where the config enters, not after the model has been loaded and scored."""
    from deftune.ada import SkipConfig, SkipRunConfig

    with pytest.raises(ValueError, match="skip policy 'density' scores blocks by measured density: "
                                         "density_examples must be >= 1, got 0"):
        SkipRunConfig(str(tmp_path), SkipConfig(policy="density"), density_examples=0)
    SkipRunConfig(str(tmp_path), SkipConfig(policy="gate"), density_examples=0)  # gates need no examples


def test_prepared_run_computes_what_the_gated_model_computed(tiny_run):
    """Merged adapter + gates folded once == the trained model with its gate hooks (eval mode).

    The gates sit near 0.5, so a model with unfolded gates (× 1) or gates folded twice (× g²)
    gives other logits, even where the tiny model's accuracy would not move.
    """
    from safetensors.torch import load_file

    from deftune.ada import AdaConfig, AdaExtension
    from deftune.ada.pipeline import prepare_run
    from deftune.runs import EXTENSION_FILE
    from deftune.train import eval_batches, load_run

    run_dir, _, gates = tiny_run
    assert all(0.3 < g < 0.7 for g in gates.values())  # far from 1: folding must matter
    prepared, tokenizer, cfg, loaded = prepare_run(run_dir)
    assert loaded == pytest.approx(gates)

    gated, _, _ = load_run(run_dir)  # the adapter unmerged; gates put back as hooks
    ext = AdaExtension(AdaConfig(gate="sigmoid", density_weighting="uniform"))
    ext.prepare(gated)
    state = load_file(str(run_dir / EXTENSION_FILE))
    with torch.no_grad():
        ext.gates.theta.copy_(state["0.ada.logits"] / ext.gates.logit_scale)
    assert ext.gate_values() == pytest.approx(gates)
    batch = {k: v for k, v in eval_batches(cfg, tokenizer)[0].items() if k != "labels"}
    try:
        with torch.no_grad():
            expected = gated(**batch).logits
            torch.testing.assert_close(prepared(**batch).logits, expected, rtol=1e-4, atol=1e-4)
    finally:
        ext.close()
    with torch.no_grad():
        without_gates = gated(**batch).logits  # hooks removed: the run's model with every gate at 1
    assert (without_gates - expected).abs().max() > 0.1


@pytest.mark.parametrize("name", ["prompt", "prefix", "adapter"])
def test_plain_model_names_the_methods_that_cannot_be_merged(name):
    from tests.conftest import tiny_bert

    from deftune.ada.pipeline import plain_model
    from deftune.methods import MethodConfig, apply_method

    with pytest.raises(NotImplementedError, match=rf"method '{name}' cannot be merged.*lora/dora/ia3"):
        plain_model(apply_method(tiny_bert(), MethodConfig(name)))


def test_plain_model_merges_lora_and_takes_a_single_stack_name():
    from tests.conftest import tiny_bert

    from deftune.ada import SkipConfig
    from deftune.ada.pipeline import plain_model
    from deftune.methods import MethodConfig, apply_method

    model = plain_model(apply_method(tiny_bert(), MethodConfig("lora")))
    assert type(model).__name__ == "BertForSequenceClassification"
    assert SkipConfig(stacks="encoder").stacks == ("encoder",)


@pytest.mark.parametrize("scored_on", [{"eval_subset": 7}, {"holdout": 9}])
def test_skip_scores_the_examples_the_run_was_scored_on(tiny_run, tmp_path, scored_on):
    """With ``eval_subset`` the run is scored on a fixed draw of the dev set, with ``holdout`` on the
    training examples it held out; ``deftune skip`` must score those same examples (it drew its
    own dev subset, with the run's seed, and ignored the holdout before)."""
    import shutil

    from deftune.ada import SkipConfig
    from deftune.ada.pipeline import SkipRunConfig, prepare_run, skip_run
    from deftune.data.glue import EVAL_SUBSET_SEED
    from deftune.runs import CONFIG_FILE
    from deftune.train import eval_batches, evaluate_glue

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run[0], run_dir)
    dev = run_dir.parent / "glue" / "SST-2"
    dev.mkdir(parents=True)
    (dev / "dev.tsv").write_text("sentence\tlabel\n" + "\n".join(
        f"{w} {v} film\t{(i * 7 + j) % 2}" for i, w in enumerate(["good", "bad", "great", "awful", "fun", "dull"])
        for j, v in enumerate(["plot", "film", "fun", "dull", "good"])) + "\n")
    config = json.loads((run_dir / CONFIG_FILE).read_text())
    config["train"].update(data_dir=str(run_dir.parent / "glue"), seed=EVAL_SUBSET_SEED + 1, **scored_on)
    (run_dir / CONFIG_FILE).write_text(json.dumps(config))
    if "holdout" in scored_on:
        shutil.copy(tiny_run[0].parent / "glue" / "SST-2" / "train.tsv", dev / "train.tsv")
    model, tokenizer, cfg, _ = prepare_run(run_dir)
    split = "holdout" if "holdout" in scored_on else "dev"
    assert len([x for b in eval_batches(cfg, tokenizer) for x in b["labels"]]) == next(iter(scored_on.values()))
    expected = evaluate_glue(model, tokenizer, cfg, split=split).metrics["accuracy"]
    result = skip_run(SkipRunConfig(run_dir=str(run_dir), skip=SkipConfig(policy="topk", keep=3), save=False,
                                    latency_repeats=0))
    assert result.before == pytest.approx(expected)
