"""``GenConfig``: every knob of a generative (causal-LM / seq2seq) DEFT run, validated.

One flat dataclass, so the command line maps onto it field by field; the density-loss fields are
gathered into a :class:`deftune.losses.DensityLossConfig` by :meth:`GenConfig.density_config`
(which validates them once more with that class's own messages).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from deftune.losses import DensityLossConfig

PROMPT_STYLES = ("auto", "chat", "plain")
DEVICES = ("cpu", "cuda", "auto")


@dataclass
class GenConfig:
    """A generative DEFT run on extractive QA (SQuAD v1.1).

    Attributes:
        model: ``smollm2`` (default decoder), ``tiny-llama`` / ``tiny-gpt2`` / ``tiny-t5`` (random
            weights, built in code, for tests), or a local folder for ``from_pretrained``.
        method: PEFT method, a key of :data:`deftune.generative.peft_methods.PEFT_METHODS`
            (``lora``, ``dora``, ``ia3``, ``loha``, ``lokr``) or ``full`` (no adapter).
        lora_r: rank of LoRA-family adapters.
        lora_alpha: LoRA scaling numerator (scale = lora_alpha / lora_r).
        lora_dropout: dropout on the adapter input (``lora`` and ``dora`` only; other methods refuse
            a non-zero value).
        target_modules: modules that get an adapter; ``all-linear`` (peft's keyword: every linear
            layer but the output head, so gate_proj / up_proj too) or a comma-separated list. ``ia3``
            keeps peft's per-architecture targets (llama: k/v/down_proj) and refuses any other value.
        alpha: weight of the density loss; 0 is plain PEFT through the same code path.
        loss: density surrogate (``l0`` DEFT, ``l1`` ProSparse, ``tanh``, ``sigmoid``).
        eps: epsilon of the l0 surrogate.
        alpha_schedule: ``constant``, ``linear`` or ``sine`` (ProSparse) ramp of alpha.
        alpha_warmup_steps: length of the alpha ramp.
        site: ``act`` (activated gate, as the official code) or ``product`` (act(gate) * up).
        stack_weights: weight of each stack's density loss (``encoder`` / ``decoder``).
        relufy: None (``none`` on the command line), or an activation that replaces the MLP activation before training
            (``relu``, ``fatrelu``, ``shifted_relu``; see :mod:`deftune.generative.relufy`).
        relu_threshold: threshold of ``fatrelu`` / shift of ``shifted_relu``.
        act_threshold_density: None, or a target activation density in (0, 1]: per-layer
            thresholds ``t_l`` are calibrated on the training prompts of the model before training
            (:func:`deftune.sparse.calibrate_thresholds`) and ``|a| <= t_l`` is set to exactly 0
            during training and every evaluation (as CATS, Lee et al. 2024, fine-tunes through
            its thresholds). For SiLU models, whose exact zeros lie below x = -88.7. They act on
            ``site``: ``act`` (the activated gate) or ``product`` (``act(gate) * up``, the input
            of the down projection, as TEAL, Liu et al. 2024; its zeros skip rows of ``W_down``
            only, and cost far less quality).
        act_threshold_mode: how the target is shared among layers
            (:data:`deftune.sparse.calibrate.THRESHOLD_MODES`): ``layer`` (every layer at the target),
            ``global`` (one threshold for all layers) or ``energy`` (every layer loses the same
            fraction of its activation energy, the overall density at the target).
        act_threshold_batches: training batches used for that calibration.
        act_threshold_warmup_steps: 0 (the thresholds hold from the first step), or the length of
            a progressive ramp: during training every threshold is ``t_l · sin(π/2 · step / T)``
            (ProSparse's sine schedule, applied to the thresholds), so the model adapts while its
            density falls; from step ``T`` on, and in every evaluation, it is ``t_l``.
        steps: optimizer steps.
        batch_size: examples per micro-batch.
        grad_accum: micro-batches per optimizer step.
        lr: peak learning rate (AdamW).
        lr_warmup_steps: linear learning-rate warm-up, then cosine decay to a tenth of the peak.
        weight_decay: AdamW weight decay.
        max_grad_norm: gradient clipping (0: off).
        max_length: longest training sequence in tokens: prompt + answer for decoders, the prompt
            (encoder input) alone for encoder–decoders.
        max_context_tokens: the context is cut to this many tokens around the answer sentence.
        max_new_tokens: greedy decoding length limit.
        eval_articles: SQuAD articles held out for evaluation (split by article).
        eval_questions: questions evaluated (seeded sample of the held-out articles).
        train_subset: use only this many training questions (None: all).
        ppl_texts: held-out paragraphs (eval articles) for the perplexity guard (0: skip).
        eval_batch_size: batch size for evaluation passes.
        prompt_style: ``chat`` (tokenizer's chat template), ``plain`` or ``auto`` (chat if the
            tokenizer has a template).
        data_dir: SQuAD folder or JSON file (else ``$DEFTUNE_SQUAD_DIR``).
        output_dir: run folder (adapter, config, results); None: nothing is saved.
        eval_before: also evaluate the model before training (and after ReLU-fication).
        seed: random seed (data order, split, adapter init).
        threads: ``torch.set_num_threads`` (0: leave as is).
        device: ``cpu``, ``cuda`` or ``auto``.
        log_every: steps between log lines.
        deterministic: use torch's deterministic algorithms for the run (deftune.determinism):
            GPU runs then repeat bit for bit, at some speed cost.
    """

    model: str = "smollm2"
    method: str = "lora"
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: str = "all-linear"
    alpha: float = 0.0
    loss: str = "l0"
    eps: float = 1e-7
    alpha_schedule: str = "constant"
    alpha_warmup_steps: int = 0
    site: str = "act"
    stack_weights: dict[str, float] = field(default_factory=lambda: {"encoder": 1.0, "decoder": 1.0})
    relufy: str | None = None
    relu_threshold: float = 0.0
    act_threshold_density: float | None = None
    act_threshold_mode: str = "layer"
    act_threshold_batches: int = 8
    act_threshold_warmup_steps: int = 0
    steps: int = 200
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    lr_warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 256
    max_context_tokens: int = 160
    max_new_tokens: int = 24
    eval_articles: int = 10
    eval_questions: int = 200
    train_subset: int | None = None
    ppl_texts: int = 64
    eval_batch_size: int = 16
    prompt_style: str = "auto"
    data_dir: str | None = None
    output_dir: str | None = None
    eval_before: bool = True
    seed: int = 0
    threads: int = 0
    device: str = "auto"
    log_every: int = 10
    deterministic: bool = False

    def __post_init__(self) -> None:
        from deftune.generative.peft_methods import PEFT_METHODS
        from deftune.generative.relufy import ACTIVATIONS

        if not isinstance(self.deterministic, bool):
            raise ValueError(f"deterministic must be True or False, got {self.deterministic!r}")

        if self.method != "full" and self.method not in PEFT_METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {sorted(PEFT_METHODS) + ['full']}")
        if self.relufy is not None and self.relufy not in ACTIVATIONS:
            raise ValueError(f"unknown relufy activation {self.relufy!r}; choose one of {sorted(ACTIVATIONS)} or None")
        if self.prompt_style not in PROMPT_STYLES:
            raise ValueError(f"prompt_style must be one of {PROMPT_STYLES}, got {self.prompt_style!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        from deftune.sparse.calibrate import check_threshold_options

        check_threshold_options(self.act_threshold_density, self.act_threshold_mode, self.act_threshold_batches)
        positive = ("lora_r", "steps", "batch_size", "grad_accum", "max_length", "max_context_tokens",
                    "max_new_tokens", "eval_articles", "eval_questions", "eval_batch_size", "log_every")
        def is_int(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        for name in positive:
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("lr_warmup_steps", "ppl_texts", "threads", "alpha_warmup_steps", "act_threshold_warmup_steps"):
            value = getattr(self, name)
            if not is_int(value) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        for name in ("lr", "weight_decay", "max_grad_norm", "lora_dropout", "relu_threshold", "lora_alpha"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.lr == 0 or self.lora_alpha == 0:
            raise ValueError(f"lr and lora_alpha must be > 0, got lr={self.lr!r}, lora_alpha={self.lora_alpha!r}")
        if self.lora_dropout >= 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.lora_dropout and self.method not in ("lora", "dora"):
            raise ValueError(f"lora_dropout applies to lora and dora; method {self.method!r} would ignore "
                             f"lora_dropout={self.lora_dropout!r}: leave it at 0")
        if self.method == "ia3" and self.target_modules != "all-linear":
            raise ValueError(f"ia3 uses peft's per-architecture targets (llama: k_proj, v_proj, down_proj) and would "
                             f"ignore target_modules={self.target_modules!r}: leave it at 'all-linear'")
        if self.act_threshold_warmup_steps:
            if self.act_threshold_density is None:
                raise ValueError("act_threshold_warmup_steps needs act_threshold_density (the thresholds it ramps up)")
            if self.act_threshold_warmup_steps >= self.steps:
                raise ValueError(
                    f"act_threshold_warmup_steps ({self.act_threshold_warmup_steps}) must be below steps "
                    f"({self.steps}): the model must train at the final thresholds it is evaluated with"
                )
        if self.max_context_tokens >= self.max_length:
            raise ValueError(
                f"max_context_tokens ({self.max_context_tokens}) must be below max_length "
                f"({self.max_length}) to leave room for the question and the answer"
            )
        if self.train_subset is not None and (not is_int(self.train_subset) or self.train_subset < 1):
            raise ValueError(f"train_subset must be None or >= 1, got {self.train_subset!r}")
        self.density_config()  # validates the density fields

    def density_config(self) -> DensityLossConfig:
        """The density-loss part of this run as a validated :class:`DensityLossConfig`."""
        return DensityLossConfig(
            loss=self.loss, alpha=self.alpha, eps=self.eps, schedule=self.alpha_schedule,
            warmup_steps=self.alpha_warmup_steps, stack_weights=dict(self.stack_weights), site=self.site,
        )

    @property
    def target_list(self) -> str | list[str]:
        """``target_modules`` as peft takes it (the keyword ``all-linear`` or a list of names)."""
        if self.target_modules == "all-linear":
            return "all-linear"
        return [t.strip() for t in self.target_modules.split(",") if t.strip()]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GenConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown GenConfig field(s) {unknown}; known: {sorted(known)}")
        return cls(**dict(data))
