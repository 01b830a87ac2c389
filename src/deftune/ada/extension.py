"""ADA-DEFT as a :class:`deftune.train.TrainExtension`: gates, gate penalty, density weights.

    from deftune.train import TrainConfig, train_glue
    from deftune.ada import AdaConfig, AdaExtension
    run = train_glue(TrainConfig(task="sst2", alpha=1.0, output_dir="runs/ada"),
                     extensions=[AdaExtension(AdaConfig(gate="hard_concrete", penalty=0.05))])

What it adds to the loop (formulation and reasons in ``docs/ada.md``):

* one gate ``g_l`` per MLP block, scaling the block's output in the residual stream
  (:class:`deftune.ada.wrappers.MLPGates`, hooks on the down projections);
* ``extra_loss = lambda(step) · mean_l openness(g_l)`` (:meth:`Gates.penalty`);
* per-layer weights of the DEFT density loss, ``w_l = g_l / mean_{l' in stack} g_{l'}``
  (``DensityRegularizer.layer_weights``), set from the same forward pass's gates. They need the
  loop to hand over its regulariser (:meth:`AdaExtension.bind_regularizer`); without it the
  density loss stays uniform and :meth:`log` reports ``ada/density_weighting_bound = 0``.

The state saved in the run directory (``extension.safetensors``, keys prefixed by the extension's
index) holds ``ada.logits`` ``(L,)``, ``ada.gates`` ``(L,)`` (inference gates) and
``ada.blocks`` ``(L, 2)`` (stack id 0=encoder/1=decoder, layer); :func:`load_gates` reads it back.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from deftune.ada.config import AdaConfig
from deftune.ada.gates import Gates, make_gates
from deftune.ada.wrappers import MLPGates
from deftune.arch import ActivationSite, find_activation_sites

STACK_IDS = {"encoder": 0, "decoder": 1}
STACK_NAMES = {v: k for k, v in STACK_IDS.items()}


class AdaExtension:
    """Learned per-MLP-block gates added to DEFT training (implements ``TrainExtension``)."""

    def __init__(self, config: AdaConfig | None = None) -> None:
        self.config = config or AdaConfig()
        self.sites: list[ActivationSite] = []
        self.gates: Gates | None = None
        self.hooks: MLPGates | None = None
        self.layer_weights: dict[str, Tensor] = {}
        self._bound = False
        self._model: nn.Module | None = None
        self._step = 0
        self._last_penalty = 0.0
        self._warned = False

    # -- TrainExtension ----------------------------------------------------------------------
    def prepare(self, model: nn.Module) -> None:
        """Create one gate per MLP block of ``model`` and attach the gate hooks."""
        if self.hooks is not None:
            raise RuntimeError("AdaExtension.prepare was already called; build one extension per run")
        self._model = model
        self.sites = find_activation_sites(model, self.config.site)  # type: ignore[arg-type]
        self.gates = make_gates(self.config.gate, len(self.sites), **self.config.gate_kwargs())
        self.hooks = MLPGates(model, self.sites, self._gates_for_pass, self._set_density_weights)
        self.hooks.attach()

    def bind_regularizer(self, regularizer) -> None:
        """Let the gates weight ``regularizer``'s per-layer density loss (call once, before training)."""
        if self.config.density_weighting == "uniform":
            return
        regularizer.layer_weights = self.layer_weights
        self._bound = True

    def extra_loss(self, model: nn.Module, step: int) -> Tensor | None:
        """``lambda(step) · mean gate openness``."""
        gates = self._require_gates()
        self._step = step
        if self.config.density_weighting != "uniform" and not self._bound and not self._warned:
            warnings.warn(
                "AdaExtension: the training loop did not call bind_regularizer(), so the gates do not "
                "weight the density loss (it stays uniform over layers)",
                stacklevel=2,
            )
            self._warned = True
        lam = self.config.penalty_at(step)
        penalty = gates.penalty()
        self._last_penalty = float(penalty.detach())
        return lam * penalty if lam > 0 else None

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [self._require_gates().theta]

    def state_dict(self) -> dict[str, Tensor]:
        gates = self._require_gates()
        with torch.no_grad():
            blocks = torch.tensor([[STACK_IDS[s.stack], s.layer] for s in self.sites], dtype=torch.int64)
            return {
                "ada.logits": gates.logits.detach().clone(),
                "ada.gates": gates.deterministic().detach().clone(),
                "ada.blocks": blocks,
            }

    def log(self) -> dict[str, float]:
        out = {f"ada/gate/{name}": value for name, value in self.gate_values().items()}
        out["ada/penalty"] = self._last_penalty
        out["ada/lambda"] = self.config.penalty_at(self._step)
        out["ada/density_weighting_bound"] = float(self._bound)
        return out

    # -- extras ------------------------------------------------------------------------------
    def gate_values(self) -> dict[str, float]:
        """Inference gates per block name."""
        gates = self._require_gates()
        with torch.no_grad():
            values = gates.deterministic().tolist()
        return {s.name: float(v) for s, v in zip(self.sites, values)}

    def close(self) -> None:
        """Remove the gate hooks (the model then runs ungated)."""
        if self.hooks is not None:
            self.hooks.detach()

    def _require_gates(self) -> Gates:
        if self.gates is None:
            raise RuntimeError("AdaExtension.prepare(model) must be called first")
        return self.gates

    def _gates_for_pass(self) -> Tensor:
        gates = self._require_gates()
        assert self._model is not None
        training = self._model.training and torch.is_grad_enabled()
        return gates.sample() if training else gates.deterministic()  # (L,)

    def _set_density_weights(self, g: Tensor) -> None:
        if not self._bound:
            return
        w = g.detach() if self.config.density_weighting == "gate" else g
        by_stack: dict[str, list[int]] = {}
        for i, s in enumerate(self.sites):
            by_stack.setdefault(s.stack, []).append(i)
        for idx in by_stack.values():
            ws = w[idx]  # (L_stack,)
            ws = ws / ws.mean().clamp_min(1e-3)
            for j, i in enumerate(idx):
                self.layer_weights[self.sites[i].name] = ws[j]


def load_gates(run_dir: str | os.PathLike) -> dict[str, float] | None:
    """The inference gates saved by an :class:`AdaExtension` in a run directory, or ``None``."""
    from safetensors.torch import load_file

    from deftune.runs import EXTENSION_FILE

    path = Path(run_dir) / EXTENSION_FILE
    if not path.is_file():
        return None
    state = load_file(str(path))
    prefixes = [k[: -len("ada.gates")] for k in state if k.endswith("ada.gates")]
    if not prefixes:
        return None
    if len(prefixes) > 1:
        raise ValueError(f"{path} holds gates of several ADA extensions ({prefixes}); expected one")
    p = prefixes[0]
    gates = state[f"{p}ada.gates"].tolist()
    blocks = state[f"{p}ada.blocks"].tolist()
    return {f"{STACK_NAMES[int(s)]}.{int(layer)}": float(g) for (s, layer), g in zip(blocks, gates)}
