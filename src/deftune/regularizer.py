"""DEFT on any model: hooks + density loss added to the task loss.

The user builds the PEFT model (``peft.get_peft_model``) and wraps training in a
:class:`DensityRegularizer`::

    reg = DensityRegularizer(peft_model, DensityLossConfig(alpha=1.0))
    with reg:
        for step, batch in enumerate(loader):
            out = peft_model(**batch)
            loss, parts = reg.total_loss(out.loss, step)
            loss.backward(); opt.step(); opt.zero_grad()
    print(reg.recorder.result().table())

PEFT is the same code with ``alpha=0``: the hooks still run (so exact density is logged the same
way), the density term is computed and multiplied by zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from deftune.arch import ActivationSite
from deftune.density import DEFAULT_THRESHOLDS, ActivationRecorder
from deftune.losses import DensityLossConfig, combine_layer_losses


@dataclass
class LossParts:
    """The pieces of one step's loss (floats, for logging)."""

    task: float
    density: float
    alpha: float
    total: float


class DensityRegularizer:
    """Attach a density-loss recorder to ``model`` and combine its loss with the task loss."""

    def __init__(
        self,
        model: nn.Module,
        config: DensityLossConfig | None = None,
        *,
        sites: list[ActivationSite] | None = None,
        thresholds=DEFAULT_THRESHOLDS,
        track_stats: bool = True,
        skip_leading: int = 0,
    ) -> None:
        self.config = config or DensityLossConfig()
        self.recorder = ActivationRecorder(
            model,
            sites,
            site=self.config.site,  # type: ignore[arg-type]
            thresholds=thresholds,
            count_padding=self.config.count_padding,
            loss_fn=self.config.surrogate(),
            track_stats=track_stats,
            skip_leading=skip_leading,
        )
        self._stack_of = {s.name: s.stack for s in self.recorder.sites}
        # per-layer weights (ADA-DEFT), name -> scalar tensor; None: uniform
        self.layer_weights: dict[str, Tensor] | None = None

    def __enter__(self) -> DensityRegularizer:
        self.recorder.attach()
        return self

    def __exit__(self, *exc) -> None:
        self.recorder.detach()

    def density_loss(self) -> Tensor:
        """Combine the per-layer surrogates recorded since the last call (and clear them)."""
        losses = {k: self.config.layer_term(v) for k, v in self.recorder.pop_losses().items()}
        if self.layer_weights is not None:
            losses = {k: v * self.layer_weights[k] for k, v in losses.items()}
        return combine_layer_losses(losses, self._stack_of, self.config.stack_weights)

    def total_loss(self, task_loss: Tensor, step: int) -> tuple[Tensor, LossParts]:
        """``task_loss + α(step) · density_loss`` and its parts for logging."""
        alpha = self.config.alpha_at(step)
        density = self.density_loss().to(task_loss.dtype)
        total = task_loss + alpha * density
        with torch.no_grad():
            parts = LossParts(
                task=float(task_loss.detach()),
                density=float(density.detach()),
                alpha=alpha,
                total=float(total.detach()),
            )
        return total, parts
