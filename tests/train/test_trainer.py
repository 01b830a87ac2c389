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
    with trainer.regularizer:
        metrics = trainer.evaluate()
    assert "eval_loss" in metrics and trainer._parts_n == 0
