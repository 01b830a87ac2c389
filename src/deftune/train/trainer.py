"""``transformers.Trainer`` integration.

:class:`DeftTrainer` is a ``Trainer`` whose loss is ``task + α(step)·density`` and whose logs carry
``task_loss``, ``density_loss``, ``alpha`` and ``exact_density`` (summed over processes under
``torchrun`` / ``accelerate launch``)::

    model = get_peft_model(base, LoraConfig(...))
    trainer = DeftTrainer(model=model, args=TrainingArguments(...), train_dataset=...,
                          density_config=DensityLossConfig(alpha=1.0))
    trainer.train()

With ``alpha=0`` it is plain PEFT with the same hooks and logs. The task loss is the ``Trainer``'s own
(label smoothing and ``compute_loss_func`` included), taken as a mean over each micro-batch like the
density term, so that the ``Trainer`` divides both by the gradient-accumulation steps and α keeps its
weight whatever the accumulation and the number of processes. (A plain ``Trainer`` instead normalises
a model's loss by the accumulated batch's token count where the model takes ``num_items_in_batch``,
and — a quirk of its own — also where the model accepts ``**kwargs`` but ignores it, as sequence
classifiers do, which makes their steps GA × processes too large.)
"""

from __future__ import annotations

import warnings

from transformers import Trainer

from deftune.act_scale import density_only_scales
from deftune.losses import DensityLossConfig
from deftune.regularizer import DensityRegularizer


class DeftTrainer(Trainer):
    """A ``Trainer`` that adds the DEFT density loss and logs density."""

    def __init__(self, *args, density_config: DensityLossConfig | None = None, skip_leading: int | None = None,
                 **kwargs):
        """``skip_leading``: leading positions left out of the density (None: the model's virtual
        tokens, :func:`deftune.methods.virtual_token_count`)."""
        super().__init__(*args, **kwargs)
        if skip_leading is None:
            from deftune.methods import virtual_token_count

            skip_leading = virtual_token_count(self.model)
        # the task loss is a per-micro-batch mean, like the density term: the Trainer divides both by GA
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        if density_only_scales(self.model):
            warnings.warn(
                "this model has activation scales that only the density loss moves (act_scale_grad='density'); "
                "the Trainer's optimizer steps them like every parameter, so under Adam their speed does not "
                "depend on alpha (deftune.train.train_glue steps them by SGD at scale_lr)", stacklevel=2)
        self.regularizer = DensityRegularizer(
            self.model, density_config or DensityLossConfig(), skip_leading=skip_leading
        )
        self._parts_sum = {"task_loss": 0.0, "density_loss": 0.0}
        self._parts_n = 0

    def train(self, *args, **kwargs):
        with self.regularizer:
            return super().train(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # no num_items_in_batch: the task loss stays a mean over this micro-batch (see the module docstring)
        task_loss, outputs = super().compute_loss(model, inputs, return_outputs=True)
        if not model.training:
            return (task_loss, outputs) if return_outputs else task_loss
        loss, parts = self.regularizer.total_loss(task_loss, self.state.global_step)
        self._parts_sum["task_loss"] += parts.task
        self._parts_sum["density_loss"] += parts.density
        self._parts_n += 1
        self._last_alpha = parts.alpha
        return (loss, outputs) if return_outputs else loss

    def evaluate(self, *args, **kwargs):
        recorder = self.regularizer.recorder
        enabled, recorder.enabled = recorder.enabled, False  # eval passes don't count as training density
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            recorder.enabled = enabled

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self._parts_n and "loss" in logs:
            for key, total in self._parts_sum.items():
                logs[key] = total / self._parts_n
            logs["alpha"] = getattr(self, "_last_alpha", 0.0)
            self._parts_sum = dict.fromkeys(self._parts_sum, 0.0)
            self._parts_n = 0
            recorder = self.regularizer.recorder
            if recorder.attached and any(c.elements for c in recorder.counts.values()):
                recorder.all_reduce()
                logs["exact_density"] = recorder.result().overall
                recorder.reset()
        super().log(logs, *args, **kwargs)
