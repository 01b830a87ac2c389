"""Module wrappers that gate or remove MLP blocks, per architecture family.

Where an MLP block's output meets the residual stream differs between families, so "remove the
block" differs too (registry :data:`SKIPPERS`, keyed by :attr:`deftune.arch.ArchSpec.family`):

* ``llama`` (and GPT-2, DistilBERT, Mistral, Qwen, Gemma…): the decoder layer computes
  ``h = residual + mlp(norm(h))``; the MLP module is replaced by :class:`SkippedMLP`, which returns
  a zero tensor of the input's shape (a stride-0 view: no memory is written), so ``h = residual``.
* ``t5``: ``T5LayerFF`` computes ``h + dropout(DenseReluDense(layer_norm(h)))``; the whole
  ``T5LayerFF`` (the parent of the MLP block) is replaced by :class:`ResidualPassThrough`, which
  returns ``h`` — equal to the MLP output zeroed, and the layer norm is skipped as well.
* ``bert`` (RoBERTa, ELECTRA…): ``BertOutput`` adds the residual *inside* the block and applies
  LayerNorm: ``LayerNorm(dropout(dense(intermediate(x))) + x)``. ``intermediate`` becomes
  :class:`SkippedIntermediate` (returns its input, no compute) and ``output`` becomes
  :class:`SkippedBertOutput`, which keeps the LayerNorm and returns ``LayerNorm(0 + x)``.
* ``opt`` keeps ``fc1``/``fc2`` on the decoder layer itself: nothing can be swapped without
  patching ``forward``, so skipping raises :class:`NotImplementedError`.

Gates (training) are applied by :class:`MLPGates`: forward hooks on each block's *gate target*
(:func:`gate_path`) that multiply its output by ``g_l``. Hooks, not wrappers, because training runs
on a ``peft`` model whose adapter is saved by module name; a wrapper would rename the adapter's
keys. The gate target is the last module whose output is linear in the block's contribution to
the residual stream: the down projection in every family (dropout is linear; BERT's LayerNorm
comes after the residual add), except where the layer normalises the MLP output before adding it
(Gemma 2's ``post_feedforward_layernorm``: ``h + norm(mlp(x))``). A norm cancels any scale of its
input, so there the gate scales the norm's output instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from deftune.arch import ActivationSite, arch_spec


class SkippedMLP(nn.Module):
    """A removed MLP block whose caller adds its output to the residual: returns zeros.

    Holds no weights. Output: a stride-0 zero view of the input's shape ``(B, T, H)``.
    """

    def __init__(self, block: str = "") -> None:
        super().__init__()
        self.block = block

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        return hidden_states.new_zeros(()).expand(hidden_states.shape)  # (B, T, H), stride 0

    def extra_repr(self) -> str:
        return f"block={self.block!r}"


class ResidualPassThrough(nn.Module):
    """Replaces a pre-norm residual feed-forward sub-layer (``h + f(norm(h))``): returns ``h``."""

    def __init__(self, block: str = "") -> None:
        super().__init__()
        self.block = block

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        return hidden_states

    def extra_repr(self) -> str:
        return f"block={self.block!r}"


class SkippedIntermediate(nn.Module):
    """BERT's removed ``intermediate``: returns its input unchanged (``SkippedBertOutput`` ignores it)."""

    def forward(self, hidden_states: Tensor) -> Tensor:
        return hidden_states


class SkippedBertOutput(nn.Module):
    """BERT's removed ``output`` (dense + dropout): ``LayerNorm(0 + input_tensor)``.

    Keeps the block's LayerNorm under the same attribute name, so its state-dict keys are unchanged.
    """

    def __init__(self, layer_norm: nn.Module, block: str = "") -> None:
        super().__init__()
        self.LayerNorm = layer_norm
        self.block = block

    def forward(self, hidden_states: Tensor, input_tensor: Tensor) -> Tensor:
        return self.LayerNorm(input_tensor)  # (B, T, H)

    def extra_repr(self) -> str:
        return f"block={self.block!r}"


# ---- skip rules per family ---------------------------------------------------------------------

Replacement = dict[str, nn.Module]  # module path -> new module
SkipRule = Callable[[nn.Module, ActivationSite], Replacement]
SKIPPERS: dict[str, SkipRule] = {}


def register_skipper(*families: str) -> Callable[[SkipRule], SkipRule]:
    """Decorator: register ``rule(model, site) -> {module path: replacement}`` for ``families``."""

    def deco(rule: SkipRule) -> SkipRule:
        for family in families:
            SKIPPERS[family] = rule
        return rule

    return deco


@register_skipper("llama", "gpt2", "distilbert")
def _skip_caller_adds_residual(model: nn.Module, site: ActivationSite) -> Replacement:
    return {site.mlp_path: SkippedMLP(site.name)}


@register_skipper("t5")
def _skip_t5(model: nn.Module, site: ActivationSite) -> Replacement:
    parent = site.mlp_path.rsplit(".", 1)[0]  # ...block.N.layer.K (T5LayerFF)
    return {parent: ResidualPassThrough(site.name)}


@register_skipper("bert")
def _skip_bert(model: nn.Module, site: ActivationSite) -> Replacement:
    output = model.get_submodule(f"{site.mlp_path}.output")
    return {
        f"{site.mlp_path}.intermediate": SkippedIntermediate(),
        f"{site.mlp_path}.output": SkippedBertOutput(output.LayerNorm, site.name),
    }


def skip_replacements(model: nn.Module, site: ActivationSite) -> Replacement:
    """The module swaps that remove the MLP block of ``site``."""
    family = arch_spec(model).family
    rule = SKIPPERS.get(family)
    if rule is None:
        raise NotImplementedError(
            f"skipping MLP blocks is not implemented for the {family!r} family (supported: "
            f"{sorted(SKIPPERS)}); register a rule with deftune.ada.wrappers.register_skipper"
        )
    return rule(model, site)


def set_submodule(model: nn.Module, path: str, module: nn.Module) -> nn.Module:
    """Replace the module at ``path`` with ``module``; returns the old one."""
    old = model.get_submodule(path)
    model.set_submodule(path, module)
    return old


# ---- gates -------------------------------------------------------------------------------------


def down_proj_path(model: nn.Module, site: ActivationSite) -> str:
    """Module path of the down projection of ``site``'s MLP block."""
    return f"{site.mlp_path}.{arch_spec(model).down_proj}"


# layer attributes that normalise the MLP output before the residual add (``h + norm(mlp(x))``)
POST_MLP_NORMS = ("post_feedforward_layernorm",)


def gate_path(model: nn.Module, site: ActivationSite) -> str:
    """Module path whose output a gate of ``site``'s block scales (and a folded gate is folded into).

    The down projection, or the layer's post-MLP norm where there is one (a norm would cancel a
    scale of the down projection's output).
    """
    layer_path = site.mlp_path.rsplit(".", 1)[0] if "." in site.mlp_path else ""
    layer = model.get_submodule(layer_path)
    for name in POST_MLP_NORMS:
        if isinstance(getattr(layer, name, None), nn.Module):
            return f"{layer_path}.{name}" if layer_path else name
    return down_proj_path(model, site)


@dataclass
class GateState:
    """Gate values of the current forward pass, shared between the hooks and the loss."""

    values: Tensor | None = None  # (L,)


class MLPGates:
    """Forward hooks scaling each MLP block's contribution (the output of :func:`gate_path`) by its gate.

    Args:
        model: the (possibly ``peft``-wrapped) model.
        sites: one site per gated block, in gate order.
        gate_fn: returns the ``(L,)`` gates for the current forward pass; called once per pass
            (at the first gated block), so stochastic gates share one sample across blocks.
        on_gates: optional callback receiving the gates of each pass (e.g. to set density weights).

    Use as a context manager, or :meth:`attach` / :meth:`detach`.
    """

    def __init__(
        self,
        model: nn.Module,
        sites: Sequence[ActivationSite],
        gate_fn: Callable[[], Tensor],
        on_gates: Callable[[Tensor], None] | None = None,
    ) -> None:
        self.model = model
        self.sites = list(sites)
        self.gate_fn = gate_fn
        self.on_gates = on_gates
        self.state = GateState()
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> MLPGates:
        self.attach()
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def attach(self) -> None:
        if self._handles:
            raise RuntimeError("MLPGates is already attached")
        try:
            for index, site in enumerate(self.sites):
                module = self.model.get_submodule(gate_path(self.model, site))
                self._handles.append(module.register_forward_hook(_GateHook(self, index)))
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.state.values = None

    @property
    def attached(self) -> bool:
        return bool(self._handles)



class _GateHook:
    """The forward hook of one gated block: an object holding its :class:`MLPGates`, not a closure,
    so that ``copy.deepcopy`` of a gated model gives a copy with gates of its own (a closure would
    keep reading the original's)."""

    def __init__(self, gates: MLPGates, index: int) -> None:
        self.gates = gates
        self.index = index

    def __call__(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        gates = self.gates
        if self.index == 0 or gates.state.values is None:
            gates.state.values = gates.gate_fn()
            if gates.on_gates is not None:
                gates.on_gates(gates.state.values)
        g = gates.state.values[self.index].to(device=output.device, dtype=output.dtype)
        return output * g  # (..., H)


# RMSNorms computing ``norm(x) * (1 + weight)`` (Gemma's convention) rather than ``norm(x) * weight``
OFFSET_NORMS = frozenset({"GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm"})


def check_foldable(module: nn.Module) -> None:
    """Raise :class:`NotImplementedError` unless :func:`fold_scale_` can fold a scale into ``module``."""
    weight = getattr(module, "weight", None)
    is_affine = isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"
    if not isinstance(weight, Tensor) or not (is_affine or type(module).__name__ in OFFSET_NORMS):
        raise NotImplementedError(
            f"cannot fold a gate into {type(module).__name__}: only nn.Linear / Conv1D down "
            f"projections and the post-MLP norms {sorted(OFFSET_NORMS)} are supported; merge adapters "
            "first (peft's merge_and_unload)"
        )


def fold_scale_(module: nn.Module, scale: float) -> None:
    """Multiply a gate target's output by ``scale`` in place: an affine layer's weight and bias, or a
    Gemma-style norm's ``1 + weight``."""
    check_foldable(module)
    with torch.no_grad():
        if type(module).__name__ in OFFSET_NORMS:  # norm(x) * (1 + w) -> norm(x) * (1 + w) * scale
            module.weight.add_(1.0).mul_(scale).sub_(1.0)
            return
        module.weight.mul_(scale)
        if getattr(module, "bias", None) is not None:
            module.bias.mul_(scale)
