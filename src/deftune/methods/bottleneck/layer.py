""":class:`BottleneckLayer`: one projection (``nn.Linear`` / ``Conv1D``) wrapped with an adapter.

For a wrapped projection ``y = W x + b`` (``x``: (..., in), ``y``: (..., out)) the layer returns

* sequential (Houlsby et al. 2019):  ``y + s · U act(D y + b_D) + s · b_U``  (D: out -> k)
* parallel (He et al. 2022):         ``y + s · U act(D x + b_D) + s · b_U``  (D: in -> k)

with ``k = out // reduction_factor``. Wrapping the sublayer's *output projection* puts the adapter
exactly where Houlsby / Pfeiffer put it: after the sublayer, before its residual add and
LayerNorm (BERT's dropout then acts on the adapted output). ``U`` and ``b_U`` start at zero, so the
adapted model starts equal to the base model.

Merging is possible only for ``activation="identity"`` (the adapter is then linear):

* sequential: ``M = I + s U D``, ``W' = M W``, ``b' = M b + c``;  unmerge solves ``M W = W'``
* parallel:   ``W' = W + s U D``, ``b' = b + c``;                unmerge subtracts

where ``c = s (U b_D + b_U)``. The arithmetic runs in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from deftune.methods.bottleneck.config import BottleneckConfig
from deftune.methods.registry import MergeNotSupportedError

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "identity": nn.Identity}


def _features(layer: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a projection."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    if isinstance(layer, Conv1D):
        return layer.weight.shape[0], layer.weight.shape[1]  # Conv1D weight: (in, out)
    raise TypeError(
        f"bottleneck adapters wrap nn.Linear or transformers Conv1D projections, got {type(layer).__name__}"
    )


class BottleneckLayer(nn.Module):
    """A projection plus a bottleneck adapter (see the module docstring for the maths)."""

    adapter_layer_names = ("adapter_down", "adapter_up")

    def __init__(self, base_layer: nn.Module, config: BottleneckConfig) -> None:
        super().__init__()
        in_features, out_features = _features(base_layer)
        source = out_features if config.placement == "sequential" else in_features
        bottleneck = max(1, out_features // config.reduction_factor)
        ref = base_layer.weight
        self.base_layer = base_layer
        self.placement = config.placement
        self.activation = config.activation
        self.scaling = float(config.scaling)
        self.adapter_down = nn.Linear(source, bottleneck, device=ref.device, dtype=ref.dtype)
        self.adapter_act = ACTIVATIONS[config.activation]()
        self.adapter_up = nn.Linear(bottleneck, out_features, device=ref.device, dtype=ref.dtype)
        nn.init.zeros_(self.adapter_up.weight)  # near-identity start (Houlsby et al. 2019, §2.1)
        nn.init.zeros_(self.adapter_up.bias)
        self.merged = False
        self._added_bias = False

    # peft-style access to the wrapped projection's tensors
    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

    def adapter(self, x: Tensor) -> Tensor:
        # x: (..., source) -> (..., out)
        return self.scaling * self.adapter_up(self.adapter_act(self.adapter_down(x)))

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        y = self.base_layer(x, *args, **kwargs)  # (..., out)
        if self.merged:
            return y
        return y + self.adapter(y if self.placement == "sequential" else x)

    # ---- merge / unmerge (linear adapters only)
    def _check_mergeable(self) -> None:
        if self.activation != "identity":
            raise MergeNotSupportedError(
                f"a bottleneck adapter with activation {self.activation!r} is non-linear and cannot "
                "be folded into the base weights; only adapter_activation='identity' adapters merge"
            )

    def _dense(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(W (out, in), b (out,), M or UD (out, ·), c (out,))`` in float64."""
        w = self.base_layer.weight.detach().double()
        w = w.T if isinstance(self.base_layer, Conv1D) else w
        bias = self.base_layer.bias
        b = (
            torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
            if bias is None
            else bias.detach().double()
        )
        u, d = self.adapter_up.weight.double(), self.adapter_down.weight.double()  # (out, k), (k, source)
        c = self.scaling * (u @ self.adapter_down.bias.double() + self.adapter_up.bias.double())
        ud = self.scaling * (u @ d)  # (out, source)
        if self.placement == "sequential":
            ud = ud + torch.eye(ud.shape[0], dtype=ud.dtype, device=ud.device)  # M = I + s U D
        return w, b, ud, c

    @torch.no_grad()
    def _write(self, w: Tensor, b: Tensor) -> None:
        weight = self.base_layer.weight
        weight.copy_((w.T if isinstance(self.base_layer, Conv1D) else w).to(weight.dtype))
        if self.base_layer.bias is None:
            # an adapter bias has to live somewhere once merged: give the projection one
            self.base_layer.bias = nn.Parameter(torch.zeros_like(b, dtype=weight.dtype), requires_grad=False)
            self._added_bias = True
        self.base_layer.bias.copy_(b.to(weight.dtype))

    @torch.no_grad()
    def merge(self) -> None:
        self._check_mergeable()
        if self.merged:
            return
        w, b, m, c = self._dense()
        if self.placement == "sequential":
            self._write(m @ w, m @ b + c)
        else:
            self._write(w + m, b + c)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        self._check_mergeable()
        if not self.merged:
            return
        w, b, m, c = self._dense()
        if self.placement == "sequential":
            self._write(torch.linalg.solve(m, w), torch.linalg.solve(m, b - c))
        else:
            self._write(w - m, b - c)
        if self._added_bias:
            self.base_layer.bias = None
            self._added_bias = False
        self.merged = False
