"""The training loop's parts, each against hand-computed values: learning-rate schedule, parameter
groups, the batch plan, which subsets and lengths a run uses, which steps it logs, the headline
metric, the fresh head's seed and the evaluation helpers."""

from __future__ import annotations

import json

import pytest
import torch
from tests.conftest import tiny_train_config
from torch import nn

from deftune.data.glue import EVAL_SUBSET_SEED, get_task
from deftune.train import TrainConfig, train_glue
from deftune.train.loop import _lr_lambda, _param_groups, _step_batches


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"task": "sst2", **kw})


def test_linear_schedule_warms_up_then_decays_to_zero():
    fn = _lr_lambda(_cfg(steps=10, lr_warmup_steps=2))
    # warm-up (s + 1) / 2; then (10 - s) / (10 - 2)
    assert [fn(s) for s in (0, 1, 2, 6, 9)] == pytest.approx([0.5, 1.0, 1.0, 0.5, 0.125])


def test_constant_schedule_warms_up_then_holds():
    fn = _lr_lambda(_cfg(steps=10, lr_warmup_steps=2, lr_schedule="constant"))
    assert [fn(s) for s in (0, 1, 5, 9)] == pytest.approx([0.5, 1.0, 1.0, 1.0])
    assert _lr_lambda(_cfg(steps=4, lr_warmup_steps=0, lr_schedule="constant"))(0) == 1.0


class _Heads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(2, 2)
        self.classifier = nn.Linear(2, 2)
        self.score = nn.Linear(2, 1, bias=False)


def test_parameter_groups_give_head_bias_and_rest_their_rates():
    model = _Heads()
    extra = nn.Parameter(torch.zeros(1))
    groups = _param_groups(model, _cfg(lr=1e-3, head_lr=0.1, bias_lr=0.2), [extra])
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert lr_of[id(model.body.weight)] == 1e-3
    assert lr_of[id(model.body.bias)] == 0.2
    assert lr_of[id(model.classifier.weight)] == lr_of[id(model.classifier.bias)] == 0.1  # head before bias
    assert lr_of[id(model.score.weight)] == 0.1  # decoder classifiers name their head `score`
    assert lr_of[id(extra)] == 1e-3
    defaults = {g["lr"] for g in _param_groups(_Heads(), _cfg(lr=1e-3), [])}
    assert defaults == {1e-3}


def test_the_batch_plan_splits_ranks_and_reshuffles_each_epoch():
    batches = list(range(6))
    ranks = [_step_batches(batches, 3, rank, 2, seed=0) for rank in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == batches  # two processes: disjoint, together one epoch
    three = list(range(3))
    plan = _step_batches(three, 9, 0, 1, seed=0)  # three epochs of three batches
    epochs = [plan[0:3], plan[3:6], plan[6:9]]
    assert all(sorted(e) == three for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1, "every epoch in the same order"
    assert _step_batches(list(range(8)), 8, 0, 1, seed=0) != _step_batches(list(range(8)), 8, 0, 1, seed=1)


def test_a_run_draws_its_subsets_and_lengths_as_documented(tiny_setup, tmp_path, monkeypatch):
    """Training examples: a draw by the run's seed; dev: one fixed draw for every seed (paired across
    a grid); the dev set is tokenised to at least 128 tokens, whatever the training length."""
    import deftune.train.evaluate as evaluate
    import deftune.train.loop as loop

    draws, lengths = [], []
    real_subsample, real_batches = loop.subsample, loop.make_batches
    for module, kind in ((loop, "train"), (evaluate, "eval")):  # the dev batches come from eval_batches
        monkeypatch.setattr(module, "subsample", lambda ex, n, seed=0, kind=kind:
                            draws.append((kind, n, seed)) or real_subsample(ex, n, seed))
        monkeypatch.setattr(module, "make_batches", lambda ex, tok, kind=kind, **kw:
                            lengths.append((kind, kw["max_length"])) or real_batches(ex, tok, **kw))
    train_glue(tiny_train_config(tiny_setup, tmp_path, seed=3, train_subset=20, eval_subset=9, max_length=16), progress=False)
    assert sorted(draws) == [("eval", 9, EVAL_SUBSET_SEED), ("train", 20, 3)]
    assert sorted(lengths) == [("eval", 128), ("train", 16)]


def test_logged_steps_are_every_log_every_and_the_last(tiny_setup, tmp_path):
    for steps, expected in ((5, [0, 2, 4]), (4, [0, 2, 3])):
        cfg = tiny_train_config(tiny_setup, tmp_path / str(steps), steps=steps, log_every=2)
        train_glue(cfg, progress=False)
        lines = (tmp_path / str(steps) / "run" / "train_log.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in lines] == expected


def test_the_optimizer_steps_at_the_scheduled_rates(tiny_setup, tmp_path, monkeypatch):
    seen: list[float] = []
    real_step = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    train_glue(tiny_train_config(tiny_setup, tmp_path, steps=4, lr=1e-3), progress=False)
    assert seen == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])


def test_the_headline_metric_is_the_tasks_first():
    from deftune.density import DensityResult
    from deftune.train.evaluate import EvalResult
    from deftune.train.loop import _make_result

    assert get_task("cola").metrics[0] == "matthews"
    density = DensityResult(per_layer={}, per_stack={}, overall=0.5, thresholds=(), count_padding=False,
                            dtype="float32", site="act")
    ev = EvalResult({"matthews": 12.0, "accuracy": 70.0}, density)
    result = _make_result(_cfg(task="cola", thresholds=()), ev, 1.0, 10)
    assert result.metric == {"name": "matthews", "value": 12.0}


def test_a_fresh_head_is_seeded_by_the_run(tmp_path):
    """A checkpoint without a task head gets a new one: the same for the same seed, another for
    another seed."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from deftune.train.model import build_base_model

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a"]
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(tmp_path)
    BertModel(BertConfig(vocab_size=6, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=16)).save_pretrained(tmp_path)

    def head(seed, state):
        torch.manual_seed(state)  # whatever the global random state was before
        model, _ = build_base_model(_cfg(model=str(tmp_path), seed=seed))
        return model.classifier.weight.detach().clone()

    assert torch.equal(head(0, state=100), head(0, state=200))
    assert not torch.equal(head(0, state=100), head(1, state=100))


def test_argmax_predictions_and_zeroing_at_tau():
    from deftune.train.evaluate import predict, zero_small_activations

    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

        def forward(self, input_ids):
            return type("Out", (), {"logits": torch.tensor([[0.0, 1.0], [2.0, 0.0]])})()

    preds, refs = predict(Fixed(), [{"input_ids": torch.zeros(2, 1), "labels": torch.tensor([1, 0])}], get_task("sst2"))
    assert preds == [1, 0] and refs == [1, 0]

    from tests.conftest import tiny_bert

    model = tiny_bert()
    act = model.bert.encoder.layer[0].intermediate.intermediate_act_fn
    x = torch.tensor([[-0.7, -0.3, 0.0, 0.3, 0.7]])
    with zero_small_activations(model, 0.5):
        seen = act(x)
    # GELU of x, then |a| <= 0.5 -> 0: only 0.7 (GELU 0.53) survives
    expected = torch.nn.functional.gelu(x)
    expected[expected.abs() <= 0.5] = 0
    assert torch.equal(seen, expected) and seen[0, -1] > 0.5
    # magnitudes, not signed values: at τ = 0.1, GELU(−0.7) = −0.17 and GELU(−0.3) = −0.11 stay;
    # an entry exactly at τ is zeroed (|a| <= τ, the complement of the density's |a| > τ)
    tau = float(act(x)[0, 3])  # GELU(0.3) as the module computes it (a scalar call may round differently)
    with zero_small_activations(model, 0.1):
        seen = act(x)
    assert seen[0, 0] < -0.16 and seen[0, 1] < -0.1 and seen[0, 2] == 0
    with zero_small_activations(model, tau):
        seen = act(x)
    assert seen[0, 3] == 0 and seen[0, 4] > tau


@pytest.mark.parametrize("kw, needle", [
    ({"steps": 0}, "steps must be a positive integer, got 0"),
    ({"batch_size": 0}, "batch_size must be a positive integer"),
    ({"log_every": 0}, "log_every must be a positive integer"),
    ({"lr": float("nan")}, "lr must be a finite number >= 0, got nan"),
    ({"head_lr": float("inf")}, "head_lr must be a finite number >= 0"),
    ({"lr_schedule": "cosine"}, r"lr_schedule must be one of \('constant', 'linear'\), got 'cosine'"),
])
def test_train_config_refuses_bad_values_by_name(kw, needle):
    with pytest.raises(ValueError, match=needle):
        _cfg(**kw)


def test_a_threshold_of_zero_is_a_valid_report():
    assert _cfg(thresholds=(0, 0.01)).thresholds == (0.0, 0.01)  # |a| > 0: the exact density


def test_evaluate_glue_scores_the_runs_dev_draw_at_its_thresholds(tiny_setup, tmp_path, monkeypatch):
    import deftune.train.evaluate as ev
    from deftune.train import evaluate_glue, load_run

    cfg = tiny_train_config(tiny_setup, tmp_path, seed=4, eval_subset=9, thresholds=(0.02, 0.5))
    train_glue(cfg, progress=False)
    model, tokenizer, saved = load_run(tmp_path / "run")
    draws, taus = [], []
    real_subsample, real_zero = ev.subsample, ev.zero_small_activations
    monkeypatch.setattr(ev, "subsample", lambda ex, n, seed=0: draws.append((n, seed)) or real_subsample(ex, n, seed))
    monkeypatch.setattr(ev, "zero_small_activations", lambda m, tau: taus.append(tau) or real_zero(m, tau))
    evaluate_glue(model, tokenizer, saved)
    assert draws == [(9, EVAL_SUBSET_SEED)] and taus == [0.02, 0.5]


def test_a_regression_run_starts_its_head_at_the_mean_training_score(tiny_setup, tmp_path, monkeypatch):
    import deftune.train.loop as loop

    model_dir, data_dir = tiny_setup
    folder = data_dir / "STS-B"
    folder.mkdir()
    rows = ["index\tg\tf\ty\ts\tl\tsentence1\tsentence2\tscore"] + [
        f"{i}\tx\tx\tx\tx\tx\tgood movie\tbad plot\t{score}" for i, score in enumerate((1.0, 2.0, 4.5))
    ]
    (folder / "train.tsv").write_text("\n".join(rows) + "\n")
    (folder / "dev.tsv").write_text("\n".join(rows) + "\n")

    class Stop(Exception):
        pass

    def spy(config, label_mean=None):
        raise Stop(label_mean)

    monkeypatch.setattr(loop, "build_model", spy)
    with pytest.raises(Stop) as stopped:
        train_glue(tiny_train_config(tiny_setup, tmp_path, task="stsb"), progress=False)
    assert stopped.value.args == (pytest.approx(2.5),)


def test_prompt_tuning_density_counts_real_tokens_and_records_the_virtual_ones_apart():
    """60 virtual tokens would outnumber a short sentence's real ones: the dev density leaves them
    out (as training and calibration do); the official convention is recorded beside it."""
    from tests.conftest import batch, tiny_bert

    from deftune.density import ActivationRecorder, measure_density
    from deftune.methods import MethodConfig, apply_method
    from deftune.train import evaluate_batches

    torch.manual_seed(0)
    model = apply_method(tiny_bert(hidden_act="relu"), MethodConfig("prompt", num_virtual_tokens=9)).eval()
    b = {**batch(b=4, t=6, pad_last=2, seed=3), "labels": torch.tensor([0, 1, 0, 1])}
    real = int(b["attention_mask"].sum())
    inputs = {k: v for k, v in b.items() if k != "labels"}
    with torch.no_grad(), ActivationRecorder(model, skip_leading=9) as by_hand_real, \
            ActivationRecorder(model) as by_hand_all:
        model(**inputs)
    ev = evaluate_batches(model, [b], get_task("sst2"), zeroed=False)
    assert ev.virtual_tokens == 9
    assert {c.tokens for c in ev.density.per_layer.values()} == {real}
    assert {c.tokens for c in ev.density_with_virtual.per_layer.values()} == {real + 4 * 9}
    assert ev.density.overall == by_hand_real.result().overall
    assert ev.density_with_virtual.overall == by_hand_all.result().overall != ev.density.overall
    assert measure_density(model, [inputs]).overall == ev.density.overall
    assert measure_density(model, [inputs], count_virtual_tokens=True).overall == ev.density_with_virtual.overall


def test_methods_without_virtual_tokens_record_one_density(tiny_setup):
    from tests.conftest import batch, tiny_bert

    from deftune.methods import MethodConfig, apply_method
    from deftune.train import evaluate_batches

    model = apply_method(tiny_bert(), MethodConfig("lora"))
    ev = evaluate_batches(model, [{**batch(b=2), "labels": torch.tensor([0, 1])}], get_task("sst2"), zeroed=False)
    assert ev.virtual_tokens == 0 and ev.density_with_virtual is None
