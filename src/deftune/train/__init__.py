"""Training with DEFT: a plain loop (:func:`train_glue`), evaluation, and a ``transformers.Trainer``
integration (:class:`DeftTrainer`)."""

from deftune.train.config import TrainConfig
from deftune.train.evaluate import (
    EvalResult,
    eval_batches,
    evaluate_batches,
    evaluate_glue,
    zero_small_activations,
)
from deftune.train.loop import TrainExtension, save_run, train_glue
from deftune.train.model import load_run


def __getattr__(name: str):
    if name == "DeftTrainer":  # lazily: importing transformers.Trainer takes seconds
        from deftune.train.trainer import DeftTrainer

        return DeftTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DeftTrainer",
    "EvalResult",
    "TrainConfig",
    "TrainExtension",
    "eval_batches",
    "evaluate_batches",
    "evaluate_glue",
    "load_run",
    "save_run",
    "train_glue",
    "zero_small_activations",
]
