"""DeftTrainer: a transformers.Trainer whose loss and logs carry the density term."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tests.conftest import batch, tiny_bert
from transformers import TrainingArguments

from deftune.losses import DensityLossConfig
from deftune.train.trainer import DeftTrainer


class _Data(torch.utils.data.Dataset):
    def __init__(self, n=12):
        b = batch(b=n, t=6, pad_last=2, seed=1)
        self.items = [
            {"input_ids": b["input_ids"][i], "attention_mask": b["attention_mask"][i], "labels": torch.tensor(i % 2)}
            for i in range(n)
        ]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


@pytest.mark.parametrize("alpha", [0.0, 2.0])
def test_trainer_logs_density_and_cleans_up(tmp_path, alpha):
    model = get_peft_model(tiny_bert(), LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"]))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                             logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                             disable_tqdm=True)
    trainer = DeftTrainer(model=model, args=args, train_dataset=_Data(),
                          density_config=DensityLossConfig(alpha=alpha))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "task_loss" in h]
    assert len(logs) == 3
    for h in logs:
        assert h["alpha"] == alpha and 0 < h["density_loss"] <= 1 and 0 < h["exact_density"] <= 1
        # the logged loss is task + alpha * density (averaged the same way over the logging window)
        assert h["loss"] == pytest.approx(h["task_loss"] + alpha * h["density_loss"], rel=1e-3, abs=1e-3)
    assert not trainer.regularizer.recorder.attached
    for module in model.modules():
        assert not module._forward_hooks


def test_trainer_warns_about_density_only_scales(tmp_path):
    from deftune.methods import MethodConfig, apply_method

    model = apply_method(tiny_bert(), MethodConfig("lora", act_scale="layer", act_scale_grad="density"))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True)
    with pytest.warns(UserWarning, match="only the density loss moves"):
        DeftTrainer(model=model, args=args, train_dataset=_Data(), density_config=DensityLossConfig(alpha=1.0))


def test_trainer_logs_window_means_and_keeps_evaluation_out(tmp_path):
    """Two steps a log: task and density losses are the means of the window (their α-sum matches the
    Trainer's own averaged loss); evaluation adds no density term and no logged parts."""
    model = get_peft_model(tiny_bert(), LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"]))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4,
                             logging_steps=2, report_to=[], save_strategy="no", use_cpu=True,
                             disable_tqdm=True)
    trainer = DeftTrainer(model=model, args=args, train_dataset=_Data(), eval_dataset=_Data(4),
                          density_config=DensityLossConfig(alpha=2.0))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "task_loss" in h]
    assert len(logs) == 2
    for h in logs:
        assert h["loss"] == pytest.approx(h["task_loss"] + 2.0 * h["density_loss"], rel=1e-3, abs=1e-3)
    recorder = trainer.regularizer.recorder
    recorder.reset()
    with trainer.regularizer:
        metrics = trainer.evaluate()
    assert "eval_loss" in metrics and trainer._parts_n == 0
    # the evaluation's activations were not counted as training density, and counting resumes after
    assert all(c.elements == 0 for c in recorder.counts.values()) and recorder.enabled


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=4,
                                        intermediate_size=64, num_hidden_layers=2, vocab_size=100))


def _one_sgd_step(trainer_cls, model, tmp_path, *, ga, bs, data, **kwargs):
    """The parameter change of one optimizer step (SGD, constant lr: linear in the gradient)."""
    import transformers

    before = [p.detach().clone() for p in model.parameters()]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=bs, gradient_accumulation_steps=ga,
                             max_steps=1, learning_rate=0.1, optim="sgd", lr_scheduler_type="constant",
                             weight_decay=0.0, max_grad_norm=0.0, report_to=[], use_cpu=True, save_strategy="no",
                             logging_strategy="no", disable_tqdm=True, seed=0,
                             label_smoothing_factor=kwargs.pop("label_smoothing_factor", 0.0))
    transformers.logging.set_verbosity_error()
    trainer_cls(model=model, args=args, train_dataset=data, **kwargs).train()
    return torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_gradient_accumulation_takes_the_step_of_the_whole_batch(tmp_path, alpha):
    """A causal LM: GA = 2 x 2 examples takes the step of 1 x 4, task and density alike (equal-length
    rows: every micro-batch mean weighs the same, and the plain Trainer's token-count normalisation
    gives the same step)."""
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": (ids := torch.randint(2, 100, (8,), generator=g)), "attention_mask": torch.ones(8, dtype=torch.long),
             "labels": ids} for _ in range(4)]
    config = DensityLossConfig(alpha=alpha)
    whole = _one_sgd_step(DeftTrainer, _llama(), tmp_path, ga=1, bs=4, data=data, density_config=config)
    accumulated = _one_sgd_step(DeftTrainer, _llama(), tmp_path, ga=2, bs=2, data=data, density_config=config)
    torch.testing.assert_close(accumulated, whole, rtol=1e-4, atol=1e-7)
    if alpha == 0.0:  # and it is the plain Trainer's step
        from transformers import Trainer

        plain = _one_sgd_step(Trainer, _llama(), tmp_path, ga=2, bs=2, data=data)
        torch.testing.assert_close(accumulated, plain, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_a_sequence_classifier_under_accumulation_takes_the_whole_batchs_step(tmp_path, alpha):
    """BERT's classifier accepts ``**kwargs`` but ignores ``num_items_in_batch``: a plain Trainer
    then neither divides its loss by GA nor normalises it (a step GA times too large). DeftTrainer
    takes per-micro-batch means, so task and density keep their weights: 2 x 2 examples = 1 x 4."""
    from transformers import BertConfig, BertForSequenceClassification

    def bert():
        torch.manual_seed(0)
        return BertForSequenceClassification(BertConfig(
            vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))

    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(1, 100, (6,), generator=g), "attention_mask": torch.ones(6, dtype=torch.long),
             "labels": torch.tensor(i % 2)} for i in range(4)]
    config = DensityLossConfig(alpha=alpha)
    whole = _one_sgd_step(DeftTrainer, bert(), tmp_path, ga=1, bs=4, data=data, density_config=config)
    accumulated = _one_sgd_step(DeftTrainer, bert(), tmp_path, ga=2, bs=2, data=data, density_config=config)
    torch.testing.assert_close(accumulated, whole, rtol=1e-4, atol=1e-7)


def test_the_task_loss_is_the_trainers_own_label_smoothing_included(tmp_path):
    from transformers import Trainer

    def step(cls, **kw):
        torch.manual_seed(0)
        model = tiny_bert()
        return _one_sgd_step(cls, model, tmp_path, ga=1, bs=4, data=_Data(4), label_smoothing_factor=0.3, **kw)

    deft = step(DeftTrainer, density_config=DensityLossConfig(alpha=0.0))
    torch.testing.assert_close(deft, step(Trainer))


def test_prompt_tuning_virtual_tokens_are_left_out_by_default(tmp_path):
    from deftune.methods import MethodConfig, apply_method

    model = apply_method(tiny_bert(), MethodConfig("prompt", num_virtual_tokens=5))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True)
    assert DeftTrainer(model=model, args=args, train_dataset=_Data()).regularizer.recorder.skip_leading == 5
    assert DeftTrainer(model=model, args=args, train_dataset=_Data(), skip_leading=0).regularizer.recorder.skip_leading == 0
