"""Validated configuration of one GLUE training run (PEFT when ``alpha == 0``, DEFT otherwise)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from deftune.losses import ALPHA_SCHEDULES, DENSITY_LOSSES, DensityLossConfig

LR_SCHEDULES = ("constant", "linear")


@dataclass
class TrainConfig:
    """One fine-tuning run on a GLUE task.

    Attributes:
        task: GLUE task name (sst2, cola, mrpc, rte, stsb, qnli, mnli, qqp).
        model: model name (``minilm``, ``minilm-relu``, a local folder or Hub id).
        method: ``lora``, ``dora``, ``ia3``, ``prefix``, ``prompt``, ``ptuning``, ``adapter``,
            ``bitfit`` or ``full`` (:data:`deftune.methods.METHODS`).
        method_options: overrides passed to :class:`deftune.methods.MethodConfig`, e.g.
            ``act_scale=layer`` (learned activation scales) or ``act_scale=layer,act_scale_grad=density``
            (scales that only the density loss moves).
        alpha: density-loss weight α (0 = plain PEFT, the same code path).
        loss: the density surrogate: ``l0`` (the paper's a²/(a²+ε)), ``tanh`` (tanh(β|a|), for
            ReLU models), ``sigmoid`` or ``l1`` (:class:`deftune.losses.DensityLossConfig`).
        eps: ε of the ``l0`` surrogate (the paper's 1e-7).
        beta: β of the ``tanh`` / ``sigmoid`` surrogates.
        schedule: α over the steps: ``constant``, ``linear`` (warm-up from 0) or ``sine``.
        warmup_steps: steps over which α warms up (``linear`` / ``sine`` schedules).
        site: ``act`` (activation output; the activated gate of gated MLPs, as the paper) or
            ``product`` (gated MLPs: act(gate) · up, the down projection's input).
        count_padding: count padding tokens in the density loss too (the official DEFT code).
        stack_weights: weight of each stack's mean layer loss (``encoder=1,decoder=1``).
        density_target: None (the paper's density loss), or a density in (0, 1] at which each
            layer's density loss stops: the per-layer hinge ``max(0, ρ̃_l − density_target)``
            (``DensityLossConfig.target``); the train log's ``density_loss`` is then that hinge.
        steps: optimizer steps.
        batch_size: training batch size (per process).
        lr: peak learning rate of the method's parameters.
        head_lr: learning rate of the task head (None: same as ``lr``).
        bias_lr: learning rate of trainable bias vectors outside the head, e.g. the biases of
            LoRA-adapted layers with ``lora_bias=lora_only`` (None: same as ``lr``). A bias shifts
            every pre-activation of a neuron, which is what moves GELU inputs to its exact-zero
            region (x < -5.5 in fp32); see docs/recipe.md.
        scale_lr: learning rate of the learned activation scales (``--method-options act_scale=layer``;
            None: same as ``lr``); with ``act_scale_grad=density`` it is required, and is the rate of
            the scales' own SGD step.
        lr_schedule: ``linear`` (warm-up then linear decay to 0) or ``constant`` (after warm-up).
        lr_warmup_steps: learning-rate warm-up steps.
        weight_decay: AdamW weight decay.
        max_length: maximum tokens per training example.
        train_subset: use a fixed random subset of this many training examples (None: all).
        eval_subset: evaluate on a fixed subset of the dev set, the same draw for every seed (None:
            the full dev set).
        holdout: None (evaluate on the dev set), or hold this many training examples out of
            training (a fixed draw, the same for every run: :func:`deftune.data.glue.split_holdout`)
            and evaluate on them instead — for choosing α and other settings without the dev set.
        eval_batch_size: batch size for evaluation and density measurement.
        thresholds: τ values for the thresholded density |a| > τ.
        data_dir: GLUE folder (None: ``$DEFTUNE_DATA_DIR`` or the Hub).
        output_dir: run directory (None: nothing is saved).
        act_threshold_density: None, or a target activation density in (0, 1]: before training,
            per-layer thresholds ``t_l`` are calibrated (:func:`deftune.sparse.calibrate_thresholds`)
            on ``act_threshold_batches`` training batches of the model with its method added, and
            ``|a| <= t_l`` is exactly 0 during training and every evaluation — the method learns
            through the zeros (as CATS, Lee et al. 2024, fine-tunes through its thresholds). With
            ``alpha = 0`` this is the threshold route to sparsity; the thresholds are saved with the
            run (``act_thresholds.json``) and re-applied by :func:`deftune.train.load_run`.
        act_threshold_mode: how the target is shared among layers
            (:data:`deftune.sparse.calibrate.THRESHOLD_MODES`: ``layer``, ``global``, ``energy``).
        act_threshold_batches: training batches used for that calibration (a seeded draw of their
            own, so the training data order is the same with and without thresholds).
        act_threshold_ramp: 0 (the thresholds act in full from the first step), or N in
            2..``steps``: ramp them in linearly, step ``s`` using ``min(1, (s + 1) / N) · t_l``, so
            the method starts learning on a nearly dense model (as the density loss's α warm-up
            lets it). Needs ``act_threshold_density``. Evaluation and the saved run use the full ``t_l``.
        seed: random seed (model head init, data order).
        log_every: log (and measure training density) every this many steps.
        deterministic: use torch's deterministic algorithms for the run (deftune.determinism):
            GPU runs of one command then repeat bit for bit, at some speed cost (the CPU repeats
            without it).
        name: run name used in results tables (default: ``{task}-{method}-a{alpha}``).
    """

    task: str = "sst2"
    model: str = "minilm"
    method: str = "lora"
    method_options: dict[str, Any] = field(default_factory=dict)
    alpha: float = 1.0
    loss: str = "l0"
    eps: float = 1e-7
    beta: float = 10.0
    schedule: str = "constant"
    warmup_steps: int = 0
    site: str = "act"
    count_padding: bool = False
    stack_weights: dict[str, float] = field(default_factory=lambda: {"encoder": 1.0, "decoder": 1.0})
    density_target: float | None = None
    steps: int = 300
    batch_size: int = 32
    lr: float = 1e-3
    head_lr: float | None = None
    bias_lr: float | None = None
    scale_lr: float | None = None
    lr_schedule: str = "linear"
    lr_warmup_steps: int = 30
    weight_decay: float = 0.0
    max_length: int = 64
    train_subset: int | None = None
    eval_subset: int | None = None
    holdout: int | None = None
    eval_batch_size: int = 128
    thresholds: tuple[float, ...] = (1e-3, 1e-2)
    act_threshold_density: float | None = None
    act_threshold_mode: str = "layer"
    act_threshold_batches: int = 8
    act_threshold_ramp: int = 0
    data_dir: str | None = None
    output_dir: str | None = None
    seed: int = 0
    log_every: int = 25
    deterministic: bool = False
    name: str | None = None

    def __post_init__(self) -> None:
        from deftune.data.glue import get_task

        get_task(self.task)  # raises DataError naming the accepted tasks
        self.method_config()  # raises naming an unknown method or option and the accepted ones

        def is_int(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        positive_ints = ("steps", "batch_size", "max_length", "eval_batch_size", "log_every")
        for key in positive_ints:
            value = getattr(self, key)
            if not is_int(value) or value <= 0:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        for key in ("lr_warmup_steps", "seed"):
            value = getattr(self, key)
            if not is_int(value) or value < 0:
                raise ValueError(f"{key} must be an integer >= 0, got {value!r}")
        for key in ("train_subset", "eval_subset", "holdout"):
            value = getattr(self, key)
            if value is not None and (not is_int(value) or value <= 0):
                raise ValueError(f"{key} must be a positive integer or None, got {value!r}")
        optional = tuple(k for k in ("head_lr", "bias_lr", "scale_lr") if getattr(self, k) is not None)
        for key in ("lr", "weight_decay") + optional:
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{key} must be a finite number >= 0, got {value!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        self.thresholds = tuple(float(t) for t in self.thresholds)
        if any(not (math.isfinite(t) and t >= 0) for t in self.thresholds):
            raise ValueError(f"thresholds (|a| > t densities to report) must be finite and >= 0, got {self.thresholds}")
        from deftune.sparse.calibrate import check_threshold_options, check_threshold_ramp

        check_threshold_options(self.act_threshold_density, self.act_threshold_mode, self.act_threshold_batches)
        check_threshold_ramp(self.act_threshold_ramp, self.steps)
        if not isinstance(self.deterministic, bool):
            raise ValueError(f"deterministic must be True or False, got {self.deterministic!r}")
        self.density_config()  # validates alpha, eps, loss name, schedule, site (before the checks that read them)
        if self.method_options.get("act_scale_grad") == "density":
            if self.scale_lr is None:
                raise ValueError("act_scale_grad='density' steps the scales by SGD at scale_lr, which is unset: pass "
                                 "scale_lr (--scale-lr; the step is scale_lr · α · the density gradient, e.g. 3)")
            if self.site != "act":
                raise ValueError(f"act_scale_grad='density' needs the density loss on the activation output "
                                 f"(site='act'), got site={self.site!r}: the {self.site!r} site does not see the "
                                 "scales' density view")
        if self.density_target is not None and self.alpha == 0:
            raise ValueError("density_target stops the density loss, which alpha=0 turns off: set alpha > 0, or drop "
                             "density_target (--density-target)")
        if self.act_threshold_ramp and self.act_threshold_density is None:
            raise ValueError("act_threshold_ramp ramps in the thresholds of act_threshold_density, which is unset: "
                             "set act_threshold_density, or leave act_threshold_ramp at 0")

    @property
    def eval_split(self) -> str:
        """Where the run is scored: ``dev`` or ``holdout``."""
        return "holdout" if self.holdout else "dev"

    @property
    def run_name(self) -> str:
        thresholds = f"-t{self.act_threshold_density:g}" if self.act_threshold_density is not None else ""
        return self.name or f"{self.task}-{self.method}-a{self.alpha:g}{thresholds}"

    def method_config(self):
        """The :class:`deftune.methods.MethodConfig` of ``method`` and ``method_options``."""
        from deftune.methods import MethodConfig

        if "name" in self.method_options:
            raise ValueError(f"method_options may not set 'name' ({self.method_options['name']!r}): "
                             "the method is chosen by method (--method)")
        return MethodConfig.from_dict({"name": self.method, **self.method_options})

    def density_config(self) -> DensityLossConfig:
        return DensityLossConfig(
            loss=self.loss,
            alpha=self.alpha,
            eps=self.eps,
            beta=self.beta,
            schedule=self.schedule,
            warmup_steps=self.warmup_steps,
            stack_weights=dict(self.stack_weights),
            site=self.site,
            count_padding=self.count_padding,
            target=self.density_target,
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["thresholds"] = list(self.thresholds)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {unknown}; known: {sorted(names)}")
        return cls(**data)


__all__ = ["TrainConfig", "LR_SCHEDULES", "ALPHA_SCHEDULES", "DENSITY_LOSSES"]
