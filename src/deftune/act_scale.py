"""Learned activation scales: ``act(s ⊙ x) / s`` with a trainable positive ``s`` per MLP layer or neuron.

Why: DEFT reports the fraction of *exactly* non-zero activations in fp32. GELU returns exactly 0
only for inputs below about −5.5 and SiLU below about −88.7, while most pre-activations of a
pre-trained model sit between −3 and 0. Moving them past the cliff with the weights alone takes
shifts of several units per neuron, which costs accuracy. A scale ``s`` does it with one number:
``act(s·x)/s`` equals ``act(x)`` at ``s = 1`` and tends to ``relu(x)`` as ``s`` grows, so the density loss can sharpen the activation exactly as far as the task allows (the task loss
pulls the other way). The parameterisation is ``s = exp(θ)``, ``θ = 0`` at the start, with one
``θ`` per layer (``granularity="layer"``, the demo's recipe: the task and density gradients of a
whole layer meet in one number, which keeps it steady) or one per neuron (``"neuron"``).

The scale is a reparameterisation, not a new layer: since ``s > 0``,
``act(s ⊙ (W x + b)) / s`` followed by ``W_down`` equals ``act((diag(s) W) x + s ⊙ b)`` followed
by ``W_down diag(1/s)`` — it can be folded into the up (gate) and down projections.

For SiLU models the zero lies below −88.7: a scale breaks the model long before it reaches it
(``benchmarks/act_scale_probe.py``, ``docs/generative.md``), so this is a tool for GELU models.

By default both losses move ``s``: the density loss pushes it up, the task loss pushes back.
That push-back has a cost of its own — a dense run (α = 0) with scales moves them under the task
loss alone and scores below plain PEFT on three of four GLUE tasks (``docs/results_plain_peft.md``).
``grad="density"`` (``MethodConfig(act_scale_grad="density")``) lets only the density loss move
them: the model's forward treats ``s`` as a constant and the density loss sees the same values
through :meth:`ScaledActivation.density_output`, with a gradient into ``s`` (so each layer's scale
answers its own layer's density term only; the terms of later layers move the adapter, not it). A dense run then is
plain PEFT exactly, and the scale is the density loss's lever alone (stepped by SGD, see
:func:`density_only_scales`).

The wrapper replaces the activation module of every site (:func:`deftune.arch.find_activation_sites`),
so density hooks, which look for that module path, see ``act(s·x)/s`` — the same zeros as
``act(s·x)``. Use it through ``MethodConfig(act_scale="layer")`` (or ``"neuron"``); the functions
here are the mechanism (``add_act_scales``, ``act_scale_state``, ``load_act_scales``,
``remove_act_scales``, ``fold_act_scales``).
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from deftune.arch import arch_spec, find_activation_sites

GRANULARITIES: tuple[str, ...] = ("layer", "neuron")
ACT_SCALES: tuple[str, ...] = ("none", *GRANULARITIES)  # the act_scale option: no scales, or one per granularity
#: Which losses move the scales: ``all`` (the task and the density loss) or ``density`` (the
#: density loss only; the task loss sees the scale as a constant).
SCALE_GRADS: tuple[str, ...] = ("all", "density")
SCALE_FILE = "act_scales.safetensors"  # written by deftune.methods.save_adapter next to the adapter
PARAM_NAME = "log_scale"


class ScaledActivation(nn.Module):
    """``act(s ⊙ x) / s`` with ``s = exp(log_scale)`` of shape ``(features,)`` (1: one per layer),
    initially 1.

    ``density_only=True``: the output the model passes on treats ``s`` as a constant, so the task
    loss cannot move it; :meth:`density_output` (what :class:`deftune.density.ActivationRecorder`
    hands the density loss) carries the gradient into ``s``. The values are the same either way.
    """

    def __init__(self, act: nn.Module, features: int, site: str = "", *, density_only: bool = False) -> None:
        super().__init__()
        self.act = act
        self.site = site  # the activation site's stable name ("encoder.3"), for logs
        self.density_only = density_only
        self.log_scale = nn.Parameter(torch.zeros(features))

    def scale(self) -> Tensor:
        return self.log_scale.exp()

    def forward(self, x: Tensor) -> Tensor:  # x: (..., features)
        s = self.scale().to(x.dtype)
        if self.density_only:
            s = s.detach()
        return self.act(x * s) / s

    def density_output(self, x: Tensor, output: Tensor) -> Tensor:
        """The activation the density loss sees for input ``x`` and forward ``output``: ``output``
        itself, or — for density-only scales while gradients are on — the same values recomputed
        with a gradient path into ``s``."""
        if not (self.density_only and self.log_scale.requires_grad and torch.is_grad_enabled()):
            return output
        s = self.scale().to(x.dtype)
        return self.act(x * s) / s

    def extra_repr(self) -> str:
        return f"features={self.log_scale.numel()}" + (", density_only=True" if self.density_only else "")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _down(model: nn.Module, mlp_path: str) -> nn.Module:
    spec = arch_spec(model)
    if not spec.down_proj:
        raise ValueError(
            f"act_scale needs the down projection of each MLP, but the architecture family "
            f"{spec.family!r} registers none; pass down_proj=... to register_architecture"
        )
    return model.get_submodule(_join(mlp_path, spec.down_proj))


def _act_input(model: nn.Module, mlp_path: str) -> nn.Module:
    spec = arch_spec(model)
    for name in spec.act_input:
        try:
            return model.get_submodule(_join(mlp_path, name))
        except AttributeError:
            continue
    raise ValueError(
        f"cannot fold activation scales for family {spec.family!r}: no projection named {spec.act_input} "
        f"under {mlp_path!r}; register the architecture with act_input=(...)"
    )


def _features(model: nn.Module, mlp_path: str) -> int:
    down = _down(model, mlp_path)
    while isinstance(getattr(down, "base_layer", None), nn.Module):  # peft / bottleneck wrappers
        down = down.base_layer
    features = getattr(down, "in_features", None)
    if features is None:  # GPT-2 Conv1D: weight (in, out)
        features = down.weight.shape[0]
    return int(features)


def density_only_scales(model: nn.Module) -> list[nn.Parameter]:
    """The trainable ``log_scale`` parameters that only the density loss moves (``grad="density"``).

    Their gradient is ``α · ∂ρ̃/∂θ`` alone, so Adam, whose step size ignores the gradient's scale,
    would move them at the same speed for every α > 0; :func:`deftune.train.train_glue` steps them
    with plain SGD at ``scale_lr`` instead."""
    return [w.log_scale for w in scaled_activations(model).values() if w.density_only and w.log_scale.requires_grad]


def scaled_activations(model: nn.Module) -> dict[str, ScaledActivation]:
    """``{module path: wrapper}`` of the scales in ``model`` (empty when none were added)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ScaledActivation)}


def add_act_scales(
    model: nn.Module, granularity: str = "layer", *, trainable: bool = True, grad: str = "all"
) -> dict[str, ScaledActivation]:
    """Wrap every MLP activation of ``model`` in a :class:`ScaledActivation` (in place).

    ``granularity``: ``"layer"`` (one scale per MLP) or ``"neuron"`` (one per intermediate feature).
    ``grad``: which losses move the scales (:data:`SCALE_GRADS`). Returns ``{module path: wrapper}``.
    Raises when ``model`` already has scales.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"act_scale granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if grad not in SCALE_GRADS:
        raise ValueError(f"act_scale_grad must be one of {SCALE_GRADS}, got {grad!r}")
    if scaled_activations(model):
        raise ValueError("this model already has activation scales (add_act_scales was called before)")
    added: dict[str, ScaledActivation] = {}
    for site in find_activation_sites(model, "act"):
        act = model.get_submodule(site.module_path)
        ref = next(model.parameters())
        features = _features(model, site.mlp_path) if granularity == "neuron" else 1
        wrapper = ScaledActivation(act, features, site.name, density_only=grad == "density").to(device=ref.device)
        wrapper.log_scale.requires_grad_(trainable)
        model.set_submodule(site.module_path, wrapper)
        added[site.module_path] = wrapper
    return added


def remove_act_scales(model: nn.Module) -> None:
    """Put the original activation modules back (the learned scales are dropped)."""
    for path, wrapper in scaled_activations(model).items():
        model.set_submodule(path, wrapper.act)


def site_path(path: str) -> str:
    """The activation site's module path of a wrapper at ``path``: a module that wraps the scaled
    activation in turn (:class:`deftune.sparse.ThresholdedActivation` keeps it as ``.inner``) does
    not change where the scale belongs."""
    return re.sub(r"(\.inner)+$", "", path)


def act_scale_state(model: nn.Module) -> dict[str, Tensor]:
    """``{activation site path: log_scale}`` (detached, CPU), what :data:`SCALE_FILE` stores; the same
    keys with or without thresholds wrapped around the scaled activations."""
    return {site_path(path): w.log_scale.detach().cpu().contiguous() for path, w in scaled_activations(model).items()}


@torch.no_grad()
def load_act_scales(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy ``state`` (from :func:`act_scale_state`) into the wrappers of ``model``; sets must match."""
    wrappers = {site_path(path): w for path, w in scaled_activations(model).items()}
    state = {site_path(k): v for k, v in state.items()}  # saves from before the keys dropped ".inner"
    missing, unexpected = sorted(set(wrappers) - set(state)), sorted(set(state) - set(wrappers))
    if missing or unexpected:
        raise ValueError(f"activation scales do not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for path, wrapper in wrappers.items():
        if wrapper.log_scale.shape != state[path].shape:
            raise ValueError(f"{path}: saved scale shape {tuple(state[path].shape)} != {tuple(wrapper.log_scale.shape)}")
        wrapper.log_scale.copy_(state[path])


def scale_medians(model: nn.Module) -> dict[str, float]:
    """``{site name: median s}`` of every wrapped layer (what ``train_glue`` logs)."""
    return {w.site: w.scale().detach().median().item() for w in scaled_activations(model).values()}


def _plain(module: nn.Module, role: str, path: str) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    if type(module).__name__ == "BottleneckLayer" and getattr(module, "merged", False):
        module = module.base_layer  # a merged bottleneck adapter computes base_layer(x) alone
    if type(module) not in (nn.Linear, Conv1D):
        raise TypeError(
            f"cannot fold an activation scale into the {role} projection of {path!r}: it is a "
            f"{type(module).__name__}, not nn.Linear / Conv1D. Merge the adapter first (peft methods: "
            "model.merge_and_unload(); deftune's bottleneck adapter: merge_adapter(model), which needs "
            "adapter_activation='identity'), then fold."
        )
    return module


@torch.no_grad()
def fold_act_scales(model: nn.Module) -> int:
    """Fold every learned scale into the weights and unwrap the activations (in place).

    ``act(s ⊙ (W x + b)) / s`` then ``W_down`` becomes ``act(W' x + b')`` then ``W_down'`` with
    ``W' = diag(s) W``, ``b' = s ⊙ b``, ``W_down' = W_down diag(1/s)``: the model is a standard
    architecture again, with the same outputs (up to rounding) and the same exact zeros. The up and
    down projections must be plain ``nn.Linear`` / GPT-2 ``Conv1D`` (merge LoRA first). A threshold
    wrapped around a scaled activation (the threshold route) compared ``act(s z) / s`` with ``t``;
    after the fold it compares ``act(s z)`` with ``s t`` — one scale per layer only (a per-neuron
    scale under one layer threshold raises). Everything is checked before any weight changes.
    Returns the number of layers folded.
    """
    from transformers.pytorch_utils import Conv1D

    wrappers = scaled_activations(model)
    sites = {site.module_path: site for site in find_activation_sites(model, "act")}
    plan = []
    for path, wrapper in wrappers.items():
        site = site_path(path)
        mlp = sites[site].mlp_path
        up = _plain(_act_input(model, mlp), "input", path)
        down = _plain(_down(model, mlp), "down", path)
        holder = model.get_submodule(site) if site != path else None  # thresholds wrapped around the scale
        if holder is not None and wrapper.log_scale.numel() != 1:
            raise ValueError(f"{path}: per-neuron scales cannot fold under the layer threshold of "
                             f"{type(holder).__name__}; fold before applying thresholds, or remove them first")
        plan.append((path, wrapper, up, down, holder))
    for path, wrapper, up, down, holder in plan:
        s = wrapper.scale().to(up.weight.dtype)
        if isinstance(up, Conv1D):  # weight (in, out)
            up.weight.mul_(s.unsqueeze(0))
        else:  # weight (out, in)
            up.weight.mul_(s.unsqueeze(1))
        if up.bias is not None:
            up.bias.mul_(s)
        if isinstance(down, Conv1D):  # weight (features, out)
            down.weight.div_(s.unsqueeze(1))
        else:  # weight (out, features)
            down.weight.div_(s.unsqueeze(0))
        if holder is not None:
            holder.threshold = float(holder.threshold * wrapper.scale().item())
        model.set_submodule(path, wrapper.act)
    return len(wrappers)
