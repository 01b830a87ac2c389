"""Generative parts against hand-written expectations: prompt styles and text, answer encoding,
length budgets, seq2seq padding, the learning-rate schedule, configs, PEFT options, ReLU-fication."""

from __future__ import annotations

import pytest
import torch
from gen_helpers import encode_all

from deftune.data.squad import SquadExample
from deftune.generative import GenConfig, relufy
from deftune.generative.format import IGNORE_INDEX, prompt_text, resolve_style, training_batch
from deftune.generative.models import load_generative, tiny_tokenizer


class _Chat:
    chat_template = "{{ messages }}"


def test_prompt_styles_resolve_from_the_tokenizer():
    assert resolve_style("auto", tiny_tokenizer()) == "plain"
    assert resolve_style("auto", _Chat()) == "chat"
    with pytest.raises(ValueError, match="prompt_style='chat' needs a tokenizer with a chat template"):
        resolve_style("chat", tiny_tokenizer())


def test_plain_and_seq2seq_prompts_by_hand():
    tok = tiny_tokenizer()
    assert prompt_text("C", "Q", "plain", tok, seq2seq=False) == "Context: C\nQuestion: Q\nAnswer:"
    assert prompt_text("C", "Q", "plain", tok, seq2seq=True) == "question: Q context: C"


def test_a_causal_plain_answer_follows_the_colon_after_a_space(examples):
    tok = tiny_tokenizer()
    ex = examples[0]
    (item,) = encode_all([ex], tok, seq2seq=False)
    assert item.target[:-1] == tok(" " + ex.answer, add_special_tokens=False)["input_ids"]
    assert item.target[:-1] != tok(ex.answer, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("max_length", range(72, 100))
def test_every_budget_is_kept_with_a_long_answer(max_length):
    tok = tiny_tokenizer()
    answer = "the quick brown fox jumps over the lazy dog again"
    context = "Some filler sentence is here. " * 30 + f"It said {answer}. " + "More filler text follows. " * 30
    ex = SquadExample("x", "t", context, "What did it say?", (answer,), (context.index(answer),))
    (item,) = encode_all([ex], tok, seq2seq=False, max_length=max_length)
    assert len(item.prompt) + len(item.target) <= max_length


def test_seq2seq_labels_pad_with_ignore_index(examples):
    tok = tiny_tokenizer()
    # "Paris" and "Denver Broncos": targets of different lengths
    items = encode_all([examples[0], examples[4]], tok, seq2seq=True)
    short, long = sorted(range(2), key=lambda i: len(items[i].target))
    assert len(items[short].target) < len(items[long].target)
    batch = training_batch(items, tok.pad_token_id, seq2seq=True)
    n = len(items[short].target)
    assert (batch["labels"][short, n:] == IGNORE_INDEX).all()
    assert int(batch["decoder_attention_mask"][short].sum()) == n


def test_generative_lr_warms_up_then_cosine_decays_to_a_tenth():
    from deftune.generative.train import _lr_lambda

    fn = _lr_lambda(GenConfig(steps=10, lr_warmup_steps=0))
    assert fn(0) == pytest.approx(1.0) and fn(5) == pytest.approx(0.55) and fn(10) == pytest.approx(0.1)
    warm = _lr_lambda(GenConfig(steps=10, lr_warmup_steps=2))
    assert warm(0) == pytest.approx(0.5) and warm(1) == pytest.approx(1.0) and warm(2) == pytest.approx(1.0)


@pytest.mark.parametrize("kw, needle", [
    ({"lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\)"),
    ({"max_length": 64, "max_context_tokens": 64}, r"max_context_tokens \(64\) must be below max_length"),
    ({"eval_batch_size": 0}, "eval_batch_size must be an integer >= 1"),
    ({"lr": 0}, "lr and lora_alpha must be > 0"),
])
def test_gen_config_refuses_edge_values(kw, needle):
    with pytest.raises(ValueError, match=needle):
        GenConfig(**kw)


def test_gen_config_documented_defaults():
    cfg = GenConfig()
    assert (cfg.lr_warmup_steps, cfg.max_length, cfg.max_context_tokens) == (10, 256, 160)


def test_peft_options_reach_the_peft_config():
    from deftune.generative.peft_methods import apply_peft_method

    model, _ = load_generative("tiny-llama")
    dora = apply_peft_method(GenConfig(model="tiny-llama", method="dora"), model)
    assert dora.peft_config["default"].use_dora
    assert any("lora_magnitude_vector" in n for n, _ in dora.named_parameters())
    model, _ = load_generative("tiny-llama")
    loha = apply_peft_method(GenConfig(model="tiny-llama", method="loha", lora_alpha=32), model)
    assert loha.peft_config["default"].alpha == 32


def test_relufy_passes_its_threshold_on():
    model, _ = load_generative("tiny-llama")
    relufy(model, "fatrelu", 0.3)
    from deftune.generative.relufy import FATReLU

    acts = [m for m in model.modules() if isinstance(m, FATReLU)]
    assert acts and all(m.threshold == 0.3 for m in acts)


def test_gradient_clipping_uses_the_configured_norm(examples, monkeypatch):
    from deftune.generative.train import train_loop

    model, tok = load_generative("tiny-llama")
    from deftune.generative.peft_methods import apply_peft_method

    model = apply_peft_method(GenConfig(model="tiny-llama"), model)
    items = encode_all(examples[:5], tok, seq2seq=False, max_length=96)
    norms, widths = [], []
    real_clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda p, n, *a, **k: norms.append(n) or real_clip(p, n, *a, **k))
    import deftune.generative.train as gt

    real_batch = gt.training_batch
    monkeypatch.setattr(gt, "training_batch", lambda it, *a, **k: widths.append(len(it)) or real_batch(it, *a, **k))
    train_loop(model, items, GenConfig(model="tiny-llama", steps=4, batch_size=2, max_grad_norm=0.5, log_every=1),
               tok.pad_token_id)
    assert norms == [0.5] * 4
    assert widths == [2] * 4  # 5 items, batches of 2: a new epoch starts rather than a batch of 1


def test_batched_generation_equals_each_prompt_alone_with_absolute_positions(examples):
    """GPT-2 adds absolute position embeddings: a left-padded row must count its positions from its
    first real token, or the batch would generate other tokens than the prompt alone."""
    from deftune.generative.evaluate import greedy_generate
    from deftune.generative.format import prompt_batch

    model, tok = load_generative("tiny-gpt2")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    items = encode_all([examples[0], examples[2], examples[4]], tok, seq2seq=False)
    assert len({len(i.prompt) for i in items}) > 1  # different lengths: some rows are padded

    def run(chunk):
        return greedy_generate(model, prompt_batch(chunk, tok.pad_token_id, seq2seq=False), eos_id=-1,
                               pad_id=tok.pad_token_id, max_new_tokens=4)

    assert run(items) == [run([i])[0] for i in items]


def test_gradient_accumulation_averages_its_micro_batches(examples, monkeypatch):
    """Two micro-batches of the same questions give the gradient of one (the loss is divided by
    grad_accum), so accumulation changes the batch, not the step size."""
    from deftune.generative.peft_methods import apply_peft_method
    from deftune.generative.train import train_loop

    ex = examples[0]
    grads, current = {}, {}
    real_step = torch.optim.AdamW.step

    def spy(self, *a, **k):
        p = next(p for g in self.param_groups for p in g["params"] if p.grad is not None and p.grad.abs().sum() > 0)
        grads.setdefault(current["run"], p.grad.detach().clone())
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    for run, accum in (("one", 1), ("two", 2)):
        current["run"] = run
        model, tok = load_generative("tiny-llama")
        model = apply_peft_method(GenConfig(model="tiny-llama", lora_dropout=0.0), model)
        with torch.no_grad():  # LoRA B starts at zero: give the A matrices a gradient too
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
        (item,) = encode_all([ex], tok, seq2seq=False, max_length=96)
        train_loop(model, [item, item], GenConfig(model="tiny-llama", steps=1, batch_size=2, grad_accum=accum,
                                                  max_grad_norm=0.0, log_every=1, lora_dropout=0.0), tok.pad_token_id)
    torch.testing.assert_close(grads["two"], grads["one"], rtol=1e-4, atol=1e-7)


def test_exact_match_and_f1_land_in_their_own_fields(examples, monkeypatch):
    import deftune.generative.evaluate as ev

    model, tok = load_generative("tiny-llama")
    exs = examples[:1]  # answer "Paris"
    items = encode_all(exs, tok, seq2seq=False, max_length=96)
    monkeypatch.setattr(ev, "generate_answers", lambda *a, **k: ({exs[0].id: "Paris France"}, ev.GenerationOutput(tokens=[])))
    report = ev.evaluate_generative(model, tok, exs, items, max_new_tokens=2, batch_size=1)
    assert report.exact_match == 0.0 and report.f1 == pytest.approx(100 * 2 / 3)


def test_perplexity_cuts_each_text_to_max_length_with_its_bos():
    import math

    from deftune.generative.evaluate import perplexity

    model, tok = load_generative("tiny-llama")
    text = "Paris is the capital of France. It lies on the Seine. Many people live there."
    ids = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"][:7]  # 8 tokens in all
    with torch.no_grad():
        expected = math.exp(float(model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss))
    assert perplexity(model, tok, [text], max_length=8, batch_size=1) == pytest.approx(expected, rel=1e-5)


def test_held_out_questions_are_a_seeded_draw_from_held_out_articles(squad_file):
    from deftune.generative.train import prepare_squad

    cfg = GenConfig(model="tiny-llama", data_dir=str(squad_file), eval_articles=1, eval_questions=3,
                    max_length=96, max_context_tokens=48, prompt_style="plain")
    _, tok = load_generative("tiny-llama")
    data = prepare_squad(cfg, tok, seq2seq=False)
    article = {e.id.split("-")[0] for e in data.eval_examples}
    assert len(article) == 1 and not article & {i.id.split("-")[0] for i in data.train}
    held_ids = sorted(i for i in (f"{next(iter(article))}-f{f}-q{k}" for f in range(3) for k in range(2)))
    assert [e.id for e in data.eval_examples] != held_ids[:3]  # a draw, not the first questions


def test_the_summary_reads_the_1e_3_density_weighted_by_elements():
    from deftune.generative.evaluate import EvalReport

    layers = {"decoder.0": {"tokens": 10, "features": 4, "thresholded": {"0.001": 0.5, "0.01": 0.2}},
              "decoder.1": {"tokens": 10, "features": 12, "thresholded": {"0.001": 0.9, "0.01": 0.1}}}
    report = EvalReport(1.0, 2.0, 3, {"overall": 0.95, "per_stack": {"decoder": 0.95}, "per_layer": layers},
                        None, None, None)
    assert report.summary()["density_teacher_forced_tau_1e-3"] == pytest.approx((0.5 * 40 + 0.9 * 120) / 160)


def test_answers_decode_every_generated_token(examples, monkeypatch):
    import deftune.generative.evaluate as ev

    model, tok = load_generative("tiny-llama")
    ex = examples[0]
    (item,) = encode_all([ex], tok, seq2seq=False, max_length=96)
    words = tok(" Paris France", add_special_tokens=False)["input_ids"]
    monkeypatch.setattr(ev, "greedy_generate", lambda *a, **k: [list(words)])
    answers, _ = ev.generate_answers(model, tok, [item], max_new_tokens=8, batch_size=1, measure=False)
    assert answers == {ex.id: "Paris France"}


def test_questions_that_do_not_fit_are_counted_as_skipped_in_both_parts(squad_file, monkeypatch):
    import deftune.generative.train as gen_train
    from deftune.data.squad import load_squad
    from deftune.generative.format import DoesNotFit

    real = gen_train.encode_example

    def second_questions_do_not_fit(example, *args, **kwargs):
        if example.id.endswith("-q1"):
            raise DoesNotFit(example.id)
        return real(example, *args, **kwargs)

    monkeypatch.setattr(gen_train, "encode_example", second_questions_do_not_fit)
    everything = load_squad("dev", str(squad_file))
    cfg = GenConfig(model="tiny-llama", data_dir=str(squad_file), eval_articles=1, eval_questions=len(everything),
                    max_length=96, max_context_tokens=48, prompt_style="plain")
    _, tok = load_generative("tiny-llama")
    data = gen_train.prepare_squad(cfg, tok, seq2seq=False)
    assert data.skipped == sum(e.id.endswith("-q1") for e in everything) > 0
    assert [e.id for e in data.eval_examples] == [i.id for i in data.eval_items]  # kept ones, in step
    assert not any(i.id.endswith("-q1") for i in data.train + data.eval_items)
