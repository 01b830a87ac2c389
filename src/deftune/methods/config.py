""":class:`MethodConfig`: which PEFT method to apply, with its hyper-parameters (data only).

Defaults follow the DEFT paper's scripts (Runwal, Pedapati & Chen, AAAI 2025, arXiv 2402.01911):
LoRA ``r=8, lora_alpha=16`` on the query/value projections, 60 virtual tokens for prompt-style
methods, Pfeiffer bottleneck adapters with reduction factor 16. See ``docs/methods.md``.

Each hyper-parameter names the methods it applies to (``metadata["methods"]``); setting it to a
non-default value for another method is an error, so a typo such as ``MethodConfig("lora",
reduction_factor=8)`` fails loudly instead of being ignored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from deftune.act_scale import ACT_SCALES
from deftune.act_scale import SCALE_GRADS as ACT_SCALE_GRADS  # which losses move the scales

TASK_TYPES: tuple[str, ...] = (
    "SEQ_CLS",
    "CAUSAL_LM",
    "SEQ_2_SEQ_LM",
    "TOKEN_CLS",
    "QUESTION_ANS",
    "FEATURE_EXTRACTION",
)
ADAPTER_KINDS: tuple[str, ...] = ("pfeiffer", "houlsby")
LORA_BIAS: tuple[str, ...] = ("none", "lora_only", "all")
ADAPTER_ACTIVATIONS: tuple[str, ...] = ("relu", "gelu", "identity")
ADAPTER_PLACEMENTS: tuple[str, ...] = ("sequential", "parallel")
PROMPT_INITS: tuple[str, ...] = ("random", "vocab")

_LORA = ("lora", "dora")
_PROMPTS = ("prefix", "prompt", "ptuning")
_ADAPTED = ("lora", "dora", "ia3", "prefix", "prompt", "ptuning", "adapter", "bitfit")


def _for(*methods: str, default: Any = None, doc: str = "") -> Any:
    return field(default=default, metadata={"methods": methods, "doc": doc})


@dataclass
class MethodConfig:
    """A parameter-efficient fine-tuning method and its hyper-parameters (validated).

    Attributes:
        name: one of :data:`deftune.methods.METHODS` (``lora``, ``dora``, ``ia3``, ``prefix``,
            ``prompt``, ``ptuning``, ``adapter``, ``bitfit``, ``full``).
        r: LoRA / DoRA rank.
        lora_alpha: LoRA / DoRA scaling numerator (the update is scaled by ``lora_alpha / r``).
        lora_dropout: dropout on the LoRA / DoRA input.
        lora_bias: peft's ``bias`` option: ``none``, ``lora_only`` (also train the biases of the
            adapted layers) or ``all``.
        target_modules: module names to adapt (a name matches a module whose path equals it or
            ends with ``"." + name``); ``None``: per-architecture default (see ``targets.py``).
        feedforward_modules: IA3 modules whose *input* is scaled (the MLP down projections);
            ``None``: the down projections of :func:`deftune.arch.find_activation_sites`.
        num_virtual_tokens: virtual tokens of prefix / prompt / P-tuning.
        prompt_init: how prompt tuning's virtual tokens start: ``random`` (peft's default, as in
            the DEFT scripts) or ``vocab`` (each a copy of a vocabulary token's embedding drawn at
            random, peft's ``SAMPLE_VOCAB``; Lester et al. 2021, "The Power of Scale for
            Parameter-Efficient Prompt Tuning", §3.2, draw from the 5,000 most frequent tokens).
        prefix_projection: prefix tuning re-parameterised through an MLP (Li & Liang 2021).
        encoder_hidden_size: hidden size of the P-tuning prompt encoder / prefix projection
            (``None``: the model's hidden size).
        adapter_kind: ``pfeiffer`` (after the MLP only) or ``houlsby`` (after attention and MLP).
        reduction_factor: bottleneck size = hidden size // reduction_factor.
        adapter_activation: ``relu``, ``gelu`` or ``identity`` (a linear adapter, mergeable).
        adapter_placement: ``sequential`` (on the wrapped sublayer's output) or ``parallel``
            (on its input, added to its output; He et al. 2022).
        adapter_scaling: factor on the adapter's output.
        modules_to_save: extra modules trained and saved in full besides the task head.
        task_type: peft task type; ``None``: inferred from the model class
            (``*ForSequenceClassification`` -> ``SEQ_CLS``, ``*ForCausalLM`` -> ``CAUSAL_LM``, ...).
        act_scale: ``none``, or learn a positive scale ``s`` on every MLP activation,
            ``act(s·x)/s``, one per ``layer`` or per ``neuron`` (any method; saved with the adapter,
            foldable into the weights). It lets the density loss move GELU / SiLU inputs into their
            exact-zero range; see :mod:`deftune.act_scale` and ``docs/recipe.md``.
        act_scale_grad: which losses move those scales: ``all`` (task and density loss) or
            ``density`` (the density loss only, stepped by SGD at the run's ``scale_lr``: a run
            with α = 0 is then plain PEFT exactly). Needs ``act_scale``.
    """

    name: str = "lora"
    r: int = _for(*_LORA, default=8)
    lora_alpha: int = _for(*_LORA, default=16)
    lora_dropout: float = _for(*_LORA, default=0.1)
    lora_bias: str = _for(*_LORA, default="none")
    target_modules: tuple[str, ...] | None = _for("lora", "dora", "ia3", "adapter")
    feedforward_modules: tuple[str, ...] | None = _for("ia3")
    num_virtual_tokens: int = _for(*_PROMPTS, default=60)
    prompt_init: str = _for("prompt", default="random")
    prefix_projection: bool = _for("prefix", default=False)
    encoder_hidden_size: int | None = _for("prefix", "ptuning")
    adapter_kind: str = _for("adapter", default="pfeiffer")
    reduction_factor: int = _for("adapter", default=16)
    adapter_activation: str = _for("adapter", default="relu")
    adapter_placement: str = _for("adapter", default="sequential")
    adapter_scaling: float = _for("adapter", default=1.0)
    modules_to_save: tuple[str, ...] | None = _for(*_ADAPTED)
    task_type: str | None = _for(*_ADAPTED)
    act_scale: str = "none"
    act_scale_grad: str = "all"

    def __post_init__(self) -> None:
        from deftune.methods.registry import METHODS  # filled when deftune.methods is imported

        if self.name not in METHODS:
            raise ValueError(f"unknown method {self.name!r}; choose one of {sorted(METHODS)}")
        for name in ("target_modules", "feedforward_modules", "modules_to_save"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise ValueError(f"{name} must be a sequence of module names, got the string {value!r}")
            if value is not None:
                setattr(self, name, tuple(value))
        self._check_applicable()
        self._check_values()

    def _check_applicable(self) -> None:
        for f in fields(self):
            methods = f.metadata.get("methods")
            if methods is None or self.name in methods:
                continue
            default = f.default if f.default is not MISSING else None
            if getattr(self, f.name) != default:
                raise ValueError(
                    f"{f.name}={getattr(self, f.name)!r} does not apply to method {self.name!r} "
                    f"(it applies to {', '.join(methods)})"
                )

    def _check_values(self) -> None:
        for name in ("r", "lora_alpha", "num_virtual_tokens", "reduction_factor"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.encoder_hidden_size is not None and self.encoder_hidden_size < 1:
            raise ValueError(f"encoder_hidden_size must be >= 1 or None, got {self.encoder_hidden_size!r}")
        if not (0.0 <= self.lora_dropout < 1.0):
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if not math.isfinite(self.adapter_scaling):
            raise ValueError(f"adapter_scaling must be finite, got {self.adapter_scaling!r}")
        choices = {
            "lora_bias": LORA_BIAS,
            "adapter_kind": ADAPTER_KINDS,
            "adapter_activation": ADAPTER_ACTIVATIONS,
            "adapter_placement": ADAPTER_PLACEMENTS,
            "act_scale": ACT_SCALES,
            "act_scale_grad": ACT_SCALE_GRADS,
            "prompt_init": PROMPT_INITS,
        }
        for name, accepted in choices.items():
            if getattr(self, name) not in accepted:
                raise ValueError(f"{name} must be one of {accepted}, got {getattr(self, name)!r}")
        if self.act_scale_grad != "all" and self.act_scale == "none":
            raise ValueError(f"act_scale_grad={self.act_scale_grad!r} needs learned scales: set act_scale to one of "
                             f"{[a for a in ACT_SCALES if a != 'none']}, or leave act_scale_grad at 'all'")
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise ValueError(f"task_type must be one of {TASK_TYPES} or None, got {self.task_type!r}")

    # -- serialisation (JSON-friendly: tuples become lists)
    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MethodConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown MethodConfig keys {unknown}; accepted: {sorted(known)}")
        return cls(**data)

    def replace(self, **changes: Any) -> MethodConfig:
        """A validated copy with ``changes`` applied."""
        return self.from_dict({**self.to_dict(), **changes})
