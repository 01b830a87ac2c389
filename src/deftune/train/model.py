"""Building the model of a run: base model + task head + PEFT method."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from deftune.data.glue import get_task
from deftune.train.config import TrainConfig


def build_base_model(config: TrainConfig):
    """``(model, tokenizer)``: the pre-trained encoder with a fresh task head (seeded)."""
    from deftune import models

    task = get_task(config.task)
    torch.manual_seed(config.seed)  # the task head's initialisation
    model = models.load_for_classification(config.model, task.num_labels)
    tokenizer = models.load_tokenizer(config.model)
    return model, tokenizer


@torch.no_grad()
def init_regression_head(model: nn.Module, label_mean: float) -> None:
    """Start a regression head at the mean training label (its output bias; weights unchanged).

    A fresh head predicts ~0 while STS-B labels average ~2.7: with a small head learning rate the
    first hundreds of steps would go into shifting the output, and the adapter is pushed to do it.
    """
    from deftune.methods.targets import head_module_names

    names = head_module_names(model, "SEQ_CLS", None)
    linears = [m for name in names for m in model.get_submodule(name).modules() if isinstance(m, nn.Linear)]
    if not linears or linears[-1].out_features != 1 or linears[-1].bias is None:
        raise ValueError(f"no single-output regression head with a bias among {names}")
    linears[-1].bias.fill_(label_mean)


def build_model(config: TrainConfig, label_mean: float | None = None) -> tuple[nn.Module, object]:
    """``(adapted model, tokenizer)``: base model with the run's PEFT method applied.

    ``label_mean``: for regression tasks, the head starts at this value (:func:`init_regression_head`).
    """
    from deftune.methods import apply_method

    base, tokenizer = build_base_model(config)
    if label_mean is not None:
        init_regression_head(base, label_mean)
    model = apply_method(base, config.method_config())
    return model, tokenizer


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in trainable_parameters(model))


def load_run(run_dir: str | os.PathLike) -> tuple[nn.Module, object, TrainConfig]:
    """``(model, tokenizer, config)`` of a finished GLUE run, in eval mode on the CPU.

    Rebuilds the base model named in ``deftune.json``, loads the trained adapter and task head, and
    re-applies the run's activation thresholds when it trained through them (``act_threshold_density``).
    """
    from deftune.methods import load_adapter
    from deftune.runs import CONFIG_FILE, THRESHOLDS_FILE, read_json

    run_dir = Path(run_dir)
    cfg_path = run_dir / CONFIG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: is {run_dir} a deftune run directory?")
    meta = read_json(cfg_path)
    if "train" not in meta:
        kind = meta.get("kind", "unknown")
        raise ValueError(f"{run_dir} is a {kind} run, not a GLUE run: "
                         + ("score it with `deftune qa-eval`" if kind == "generative" else "its deftune.json has no 'train' entry"))
    config = TrainConfig.from_dict(meta["train"])
    base, tokenizer = build_base_model(config)
    model = load_adapter(base, run_dir)
    if config.act_threshold_density is not None:  # the run trained (and was scored) through them
        from deftune.sparse import Thresholds, apply_thresholds

        apply_thresholds(model, Thresholds.load(run_dir / THRESHOLDS_FILE))
    model.eval()
    return model, tokenizer, config
