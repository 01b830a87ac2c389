"""ReLU-fication (ProSparse, Song et al., 2024, arXiv 2402.13516) as an alternative to DEFT.

ProSparse makes a SiLU/GELU LLM activation-sparse in three steps: (1) replace the MLP activation
by ReLU and keep training; (2) add an l1 penalty on the activation whose weight rises
progressively along a sine curve (``DensityLossConfig(loss="l1", schedule="sine")``); (3) shift
the activation threshold, i.e. use FATReLU ``x if x > t else 0`` with a small ``t > 0``.

:func:`relufy` does the module swap (steps 1 and 3): every MLP activation module found by
:func:`deftune.arch.find_activation_sites` is replaced in its parent by one of
:data:`ACTIVATIONS`. The replaced module is the ``act`` site itself (``mlp.act_fn`` for LLaMA,
``mlp.act`` for GPT-2, ``DenseReluDense.act`` for T5), so for gated MLPs ``act(gate) * up``
keeps its shape and only the gate becomes sparse. Step 2 is the ordinary training loop with the
l1 loss (:func:`deftune.generative.train_generative` with ``relufy="relu", loss="l1",
alpha_schedule="sine"``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from deftune.arch import find_activation_sites


class FATReLU(nn.Module):
    """``x if x > threshold else 0`` (threshold 0 is ReLU). ProSparse's threshold-shifted ReLU."""

    def __init__(self, threshold: float = 0.0) -> None:
        super().__init__()
        self.threshold = float(threshold)

    def forward(self, x: Tensor) -> Tensor:
        return torch.where(x > self.threshold, x, torch.zeros((), dtype=x.dtype, device=x.device))

    def extra_repr(self) -> str:
        return f"threshold={self.threshold:g}"


class ShiftedReLU(nn.Module):
    """``relu(x - shift)``: a ReLU moved right by ``shift`` (sparser for ``shift > 0``)."""

    def __init__(self, shift: float = 0.0) -> None:
        super().__init__()
        self.shift = float(shift)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x - self.shift)

    def extra_repr(self) -> str:
        return f"shift={self.shift:g}"


ACTIVATIONS: dict[str, Callable[[float], nn.Module]] = {
    "relu": lambda threshold: FATReLU(0.0),
    "fatrelu": FATReLU,
    "shifted_relu": ShiftedReLU,
}


def relufy(model: nn.Module, activation: str = "relu", threshold: float = 0.0) -> list[str]:
    """Replace every MLP activation module of ``model`` by ``ACTIVATIONS[activation](threshold)``.

    Returns the replaced module paths. Works before or after ``peft`` wrapping (paths are found
    by :func:`deftune.arch.find_activation_sites`, site ``act``).

    Raises:
        ValueError: unknown activation, or an architecture whose activation is not a module
            (its ``act`` site is hooked on the input of another module).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}")
    sites = find_activation_sites(model, "act")
    replaced = []
    for site in sites:
        if site.hook != "output":
            raise ValueError(
                f"{site.name}: the activation of this architecture is not a module of its own "
                f"({site.module_path!r} is hooked on its input), so it cannot be swapped"
            )
        model.set_submodule(site.module_path, ACTIVATIONS[activation](threshold))
        replaced.append(site.module_path)
    return replaced
