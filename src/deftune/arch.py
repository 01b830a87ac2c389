"""Architecture registry: where are a model's MLP activations?

An *activation site* is the tensor that feeds an MLP's down projection:

* non-gated MLPs (BERT, GPT-2, OPT, T5 dense-ReLU): ``act(W_up x)``;
* gated MLPs (LLaMA, Gemma, T5 gated-GELU): the *activated gate* ``act(W_gate x)`` (what the
  DEFT paper and its official code regularise), or optionally the *product*
  ``act(W_gate x) * (W_up x)`` that actually multiplies ``W_down``.

Each supported ``config.model_type`` maps to an :class:`ArchSpec` holding regular expressions over
module names. The expressions match the *end* of a module path, so they keep working when the model
is wrapped by ``peft`` (``base_model.model.``…) or a task head (``bert.``…).

Register a custom architecture with :func:`register_architecture`, either with patterns or with a
callable ``finder(model) -> list[ActivationSite]``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from torch import nn

Stack = Literal["encoder", "decoder"]
SiteKind = Literal["act", "product"]
SITE_KINDS: tuple[str, ...] = ("act", "product")


@dataclass(frozen=True)
class ActivationSite:
    """One MLP activation of one layer.

    Attributes:
        name: stable layer name, ``"{stack}.{layer}"`` (e.g. ``"encoder.3"``).
        stack: ``"encoder"`` or ``"decoder"``.
        layer: layer index within the stack.
        module_path: full module name (as in ``model.named_modules()``) of the hooked module.
        hook: ``"output"`` (forward hook, the module's output is the activation) or ``"input"``
            (forward pre-hook, the module's first input is the activation).
        mlp_path: module name of the whole MLP block (used by block skipping, ADA-DEFT).
    """

    name: str
    stack: Stack
    layer: int
    module_path: str
    hook: Literal["output", "input"]
    mlp_path: str


@dataclass(frozen=True)
class SitePattern:
    """A regex over module names.

    Named groups: ``layer`` (required), ``stack`` (optional; else ``default_stack``), ``mlp``
    (the MLP block's path, required; the match start is the model prefix).
    """

    regex: str
    hook: Literal["output", "input"] = "output"
    default_stack: Stack = "encoder"
    stack_names: dict[str, Stack] = field(default_factory=dict)

    def compiled(self) -> re.Pattern[str]:
        return re.compile(self.regex)


@dataclass(frozen=True)
class ArchSpec:
    """How to find activation sites of one architecture family."""

    family: str
    model_types: tuple[str, ...]
    act: SitePattern
    product: SitePattern | None = None  # None: non-gated, the product site is the act site
    gated: bool = False
    encoder_only: bool = False  # no decoder stack (BERT-like): not a generative model
    down_proj: str = ""  # attribute name of the down projection inside the MLP block
    # attribute names (inside the MLP block) of the projection whose output enters the activation
    # (the gate projection of gated MLPs); the first that exists is used (deftune.act_scale folds
    # learned scales into it)
    act_input: tuple[str, ...] = ()
    finder: Callable[[nn.Module, SiteKind], list[ActivationSite]] | None = None


_REGISTRY: dict[str, ArchSpec] = {}


def register_architecture(spec: ArchSpec, *, overwrite: bool = False) -> ArchSpec:
    """Register ``spec`` for every ``model_type`` it lists.

    Example (a custom model whose MLP activation module is ``blocks.N.ffn.act``)::

        register_architecture(ArchSpec(
            family="mymodel", model_types=("mymodel",),
            act=SitePattern(r"(?P<mlp>blocks\\.(?P<layer>\\d+)\\.ffn)\\.act$"),
            down_proj="out"))
    """
    for model_type in spec.model_types:
        if model_type in _REGISTRY and not overwrite:
            raise ValueError(
                f"model_type {model_type!r} is already registered (family "
                f"{_REGISTRY[model_type].family!r}); pass overwrite=True to replace it."
            )
        _REGISTRY[model_type] = spec
    return spec


def spec_of_model_type(model_type: str) -> ArchSpec | None:
    """The registered :class:`ArchSpec` of a ``config.model_type`` (None when none is registered)."""
    return _REGISTRY.get(model_type)


def supported_model_types() -> list[str]:
    """The ``config.model_type`` values with a registered architecture (sorted)."""
    return sorted(_REGISTRY)


# ---- built-in architectures -------------------------------------------------------------------
# Each regex ends at the hooked module; ``(?P<mlp>...)`` spans the MLP block.

register_architecture(
    ArchSpec(
        family="bert",
        model_types=("bert", "roberta", "electra", "xlm-roberta", "camembert", "mpnet"),
        # BertLayer: intermediate.intermediate_act_fn feeds output.dense. The "MLP block" for
        # skipping is the pair (intermediate, output); we record the layer path.
        act=SitePattern(r"(?P<mlp>encoder\.layer\.(?P<layer>\d+))\.intermediate\.intermediate_act_fn$"),
        down_proj="output.dense",
        act_input=("intermediate.dense",),
        encoder_only=True,
    )
)
register_architecture(
    ArchSpec(
        family="distilbert",
        model_types=("distilbert",),
        act=SitePattern(r"(?P<mlp>transformer\.layer\.(?P<layer>\d+)\.ffn)\.activation$"),
        down_proj="lin2",
        act_input=("lin1",),
        encoder_only=True,
    )
)
_T5_STACKS: dict[str, Stack] = {"encoder": "encoder", "decoder": "decoder"}
register_architecture(
    ArchSpec(
        family="t5",
        model_types=("t5", "mt5", "umt5"),
        act=SitePattern(
            r"(?P<mlp>(?P<stack>encoder|decoder)\.block\.(?P<layer>\d+)\.layer\.\d+\.DenseReluDense)\.act$",
            stack_names=_T5_STACKS,
        ),
        # the product before T5's dropout (whose zeros in training are not sparsity), which then feeds wo
        product=SitePattern(
            r"(?P<mlp>(?P<stack>encoder|decoder)\.block\.(?P<layer>\d+)\.layer\.\d+\.DenseReluDense)\.dropout$",
            hook="input",
            stack_names=_T5_STACKS,
        ),
        down_proj="wo",
        act_input=("wi_0", "wi"),
    )
)
register_architecture(
    ArchSpec(
        family="gpt2",
        model_types=("gpt2",),
        act=SitePattern(r"(?P<mlp>h\.(?P<layer>\d+)\.mlp)\.act$", default_stack="decoder"),
        down_proj="c_proj",
        act_input=("c_fc",),
    )
)
register_architecture(
    ArchSpec(
        family="opt",
        model_types=("opt",),
        # OPT has no MLP submodule: fc1/activation_fn/fc2 sit on the decoder layer itself.
        act=SitePattern(r"(?P<mlp>decoder\.layers\.(?P<layer>\d+))\.activation_fn$", default_stack="decoder"),
        down_proj="fc2",
        act_input=("fc1",),
    )
)
register_architecture(
    ArchSpec(
        family="llama",
        model_types=("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"),
        act=SitePattern(r"(?P<mlp>layers\.(?P<layer>\d+)\.mlp)\.act_fn$", default_stack="decoder"),
        product=SitePattern(r"(?P<mlp>layers\.(?P<layer>\d+)\.mlp)\.down_proj$", hook="input", default_stack="decoder"),
        gated=True,
        down_proj="down_proj",
        act_input=("gate_proj",),
    )
)
register_architecture(
    ArchSpec(
        family="phi3",
        model_types=("phi3",),
        # Phi3MLP: one fused gate_up_proj, chunked; activation_fn(gate) * up feeds down_proj. No
        # act_input: the gate is half of a fused projection, so learned scales cannot be folded.
        act=SitePattern(r"(?P<mlp>layers\.(?P<layer>\d+)\.mlp)\.activation_fn$", default_stack="decoder"),
        product=SitePattern(r"(?P<mlp>layers\.(?P<layer>\d+)\.mlp)\.down_proj$", hook="input", default_stack="decoder"),
        gated=True,
        down_proj="down_proj",
    )
)


class UnsupportedArchitectureError(ValueError):
    """Raised when no activation site can be found for a model."""


def base_config(model: nn.Module):
    """The Hugging Face config of ``model`` (also through peft / task-head wrappers)."""
    config = getattr(model, "config", None)
    if config is None:
        for module in model.modules():
            config = getattr(module, "config", None)
            if config is not None and hasattr(config, "model_type"):
                break
    if config is None or not hasattr(config, "model_type"):
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has no Hugging Face config (config.model_type); pass "
            "sites=... explicitly or register an architecture with a finder callable."
        )
    return config


def _is_gated(model: nn.Module, spec: ArchSpec) -> bool:
    if spec.family == "t5":
        return bool(getattr(base_config(model), "is_gated_act", False))
    return spec.gated


def find_activation_sites(model: nn.Module, site: SiteKind = "act") -> list[ActivationSite]:
    """List the MLP activation sites of ``model`` in forward order (encoder first).

    Args:
        model: a ``transformers`` model, possibly wrapped by ``peft``.
        site: ``"act"`` (the activation output; for gated MLPs the activated gate) or
            ``"product"`` (for gated MLPs ``act(gate) * up``; for non-gated MLPs the same as act).

    Raises:
        UnsupportedArchitectureError: the model type is not registered or nothing matched.
    """
    if site not in SITE_KINDS:
        raise ValueError(f"site={site!r} is not one of {SITE_KINDS}")
    config = base_config(model)
    spec = _REGISTRY.get(config.model_type)
    if spec is None:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} (model_type={config.model_type!r}) is not in the architecture "
            f"registry. Supported model types: {', '.join(supported_model_types())}. Register it "
            "with deftune.arch.register_architecture(ArchSpec(family=..., model_types=("
            f"{config.model_type!r},), act=SitePattern(r'(?P<mlp>...layers\\.(?P<layer>\\d+)\\.mlp)"
            "\\.act$'))) or pass finder=callable(model, site) -> list[ActivationSite]."
        )
    if spec.finder is not None:
        return spec.finder(model, site)
    pattern = spec.product if (site == "product" and _is_gated(model, spec)) else spec.act
    if pattern is None:
        pattern = spec.act
    regex = pattern.compiled()
    sites: list[ActivationSite] = []
    for path, _module in model.named_modules():
        match = regex.search(path)
        if match is None:
            continue
        groups = match.groupdict()
        stack = pattern.stack_names.get(groups.get("stack") or "", pattern.default_stack)
        layer = int(groups["layer"])
        mlp = path[: match.start()] + groups["mlp"]
        sites.append(
            ActivationSite(
                name=f"{stack}.{layer}",
                stack=stack,
                layer=layer,
                module_path=path,
                hook=pattern.hook,
                mlp_path=mlp,
            )
        )
    if not sites:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} (model_type={config.model_type!r}) matched no activation "
            f"site with pattern {pattern.regex!r}; the module names may differ in this version "
            "of transformers. Register a custom ArchSpec (see deftune.arch.register_architecture)."
        )
    names = [s.name for s in sites]
    if len(set(names)) != len(names):
        raise UnsupportedArchitectureError(f"duplicate activation site names {names}")
    order = {"encoder": 0, "decoder": 1}
    return sorted(sites, key=lambda s: (order[s.stack], s.layer))


def arch_spec(model: nn.Module) -> ArchSpec:
    """The registered :class:`ArchSpec` for ``model``."""
    find_activation_sites(model)  # raises the helpful error if unsupported
    return _REGISTRY[base_config(model).model_type]
