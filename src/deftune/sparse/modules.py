"""Drop-in sparse MLP modules and the verb that installs them: :func:`sparsify_mlps_`.

Modules are *wrapped*, never patched: each wrapper holds the original module as ``.base`` and
:func:`restore_mlps_` puts every original back (the same objects).

* gated MLPs (LLaMA, Mistral, Qwen, Gemma: ``gate_proj``, ``up_proj``, ``down_proj``, ``act_fn``):
  the whole ``mlp`` becomes a :class:`SparseGatedMLP`, which runs
  :func:`deftune.sparse.ops.sparse_gated_mlp` (gate, threshold, and only the active rows of the
  up and down projections);
* non-gated MLPs (BERT, GPT-2, OPT, DistilBERT, T5): the activation becomes a
  :class:`SparseThresholdedActivation` and the down projection a :class:`SparseInputLinear`, which reads
  only the rows of ``W_down^T`` whose input is non-zero. This also holds for any gated MLP whose
  activation site feeds the down projection through a product (T5 gated-GELU): the product is
  zero wherever the activation is.

Thresholds are per layer (``|a| <= t_l -> 0``), keyed by the site names of
:func:`deftune.arch.find_activation_sites` (``"decoder.3"``), e.g. as produced by
``deftune.sparse.calibrate``. The Triton kernels run for CUDA fp16/bf16 inputs of at most 16
rows without gradients (decoding); anything else runs the reference (same result, dense cost).
The wrappers change ``state_dict`` keys (``mlp.base.gate_proj.weight``): restore before saving.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from torch import Tensor, nn

from deftune.arch import ActivationSite, arch_spec, find_activation_sites
from deftune.sparse.ops import DEFAULT_CONFIG, SparseMLPConfig, sparse_down_proj, sparse_gated_mlp, use_triton
from deftune.sparse.reference import Activation, GatedMLPWeights, threshold_activation
from deftune.sparse.thresholds import Thresholds, check_threshold

# Activation modules the kernels implement, by class name (torch.nn and transformers.activations).
_ACTIVATION_NAMES: dict[str, str] = {
    "SiLU": "silu",
    "SiLUActivation": "silu",
    "ReLU": "relu",
    "GELUActivation": "gelu",
    "NewGELUActivation": "gelu_tanh",
    "GELUTanh": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh",
}


def activation_name(module: nn.Module) -> str | None:
    """The kernel name of an activation module (``"silu"``, ``"gelu"``...), or None if it has none."""
    if isinstance(module, nn.GELU):
        return "gelu" if module.approximate == "none" else "gelu_tanh"
    return _ACTIVATION_NAMES.get(type(module).__name__)


def _check_threshold(threshold: float) -> float:
    check_threshold(threshold)  # |a| <= t is set to 0
    return float(threshold)


class _TransposedCache:
    """A contiguous ``weight.T`` kept in step with ``weight`` (rebuilt when it changes: a new
    storage, dtype, device or shape, or an in-place op on the parameter; an in-place op through
    ``weight.data`` bumps no version and is not seen)."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._value: Tensor | None = None

    def get(self, weight: Tensor) -> Tensor:
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device, tuple(weight.shape))
        if key != self._key:
            self._value = weight.detach().t().contiguous()
            self._key = key
        return self._value


class SparseWrapper(nn.Module):
    """Base of the wrappers: ``.base`` is the wrapped original module."""

    base: nn.Module


class SparseGatedMLP(SparseWrapper):
    """A LLaMA-style MLP whose activated gate is thresholded at ``threshold``.

    ``forward(x)`` = ``down_proj((act_fn(gate_proj x) * (|.| > t)) * up_proj x)``. On the Triton
    path it keeps a contiguous copy of ``down_proj.weight.T`` (``(I, H)``, one extra copy of the
    down weight), rebuilt when the weight changes.
    """

    def __init__(self, base: nn.Module, threshold: float, config: SparseMLPConfig = DEFAULT_CONFIG) -> None:
        super().__init__()
        for attr in ("gate_proj", "up_proj", "down_proj", "act_fn"):
            if not hasattr(base, attr):
                raise NotImplementedError(
                    f"{type(base).__name__} has no '{attr}': SparseGatedMLP wraps LLaMA-style MLPs with "
                    "gate_proj, up_proj, down_proj and act_fn (a fused gate_up_proj is not supported)"
                )
        for attr in ("gate_proj", "up_proj", "down_proj"):
            if type(getattr(base, attr)) is not nn.Linear:
                raise NotImplementedError(
                    f"{type(base).__name__}.{attr} is a {type(getattr(base, attr)).__name__}; SparseGatedMLP "
                    "needs plain nn.Linear projections (merge adapters / dequantize first)"
                )
        self.base = base
        self.threshold = _check_threshold(threshold)
        self.config = config
        name = activation_name(base.act_fn)
        self.activation: Activation = name if name is not None else base.act_fn
        self._down_t = _TransposedCache()

    def forward(self, x: Tensor) -> Tensor:  # (..., H) -> (..., H)
        b = self.base
        down = b.down_proj.weight
        params = (
            b.gate_proj.weight,
            b.up_proj.weight,
            down,
            b.gate_proj.bias,
            b.up_proj.bias,
            b.down_proj.bias,
        )
        w_down_t = self._down_t.get(down) if use_triton(x, self.config, *params) else down.t()
        weights = GatedMLPWeights(
            b.gate_proj.weight, b.up_proj.weight, w_down_t, b.gate_proj.bias, b.up_proj.bias, b.down_proj.bias
        )
        return sparse_gated_mlp(x, weights, self.threshold, self.activation, self.config)

    def extra_repr(self) -> str:
        return f"threshold={self.threshold:g}, activation={self.activation!r}"


class SparseThresholdedActivation(SparseWrapper):
    """``base(x)`` with entries ``|a| <= threshold`` set to zero."""

    def __init__(self, base: nn.Module, threshold: float) -> None:
        super().__init__()
        self.base = base
        self.threshold = _check_threshold(threshold)

    def forward(self, x: Tensor) -> Tensor:
        return threshold_activation(self.base(x), self.threshold)

    def extra_repr(self) -> str:
        return f"threshold={self.threshold:g}"


def _is_conv1d(module: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D (GPT-2): weight (in, out), y = x W + b.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


class SparseInputLinear(SparseWrapper):
    """A down projection (``nn.Linear`` or GPT-2 ``Conv1D``) that skips zero input columns."""

    def __init__(self, base: nn.Module, config: SparseMLPConfig = DEFAULT_CONFIG) -> None:
        super().__init__()
        if type(base) is not nn.Linear and not _is_conv1d(base):
            raise NotImplementedError(
                f"SparseInputLinear wraps nn.Linear or transformers Conv1D; got {type(base).__name__}"
            )
        self.base = base
        self.config = config
        self._w_t = _TransposedCache()

    @property
    def weight(self) -> Tensor:
        """The wrapped projection's weight (T5's MLP reads ``wo.weight`` to pick its dtype)."""
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    def forward(self, a: Tensor) -> Tensor:  # (..., I) -> (..., H)
        w, bias = self.base.weight, self.base.bias
        if _is_conv1d(self.base):
            w_down_t = w  # already (I, H)
        else:
            w_down_t = self._w_t.get(w) if use_triton(a, self.config, w, bias) else w.t()
        return sparse_down_proj(a, w_down_t, bias, self.config)


def _wrap_gated(
    model: nn.Module, site: ActivationSite, threshold: float, config: SparseMLPConfig
) -> list[str]:
    mlp = model.get_submodule(site.mlp_path)
    model.set_submodule(site.mlp_path, SparseGatedMLP(mlp, threshold, config))
    return [site.mlp_path]


def _wrap_act_down(
    model: nn.Module, site: ActivationSite, threshold: float, config: SparseMLPConfig
) -> list[str]:
    down_path = f"{site.mlp_path}.{arch_spec(model).down_proj}"
    act = model.get_submodule(site.module_path)
    down = model.get_submodule(down_path)
    sparse_down = SparseInputLinear(down, config)  # validates before anything is replaced
    model.set_submodule(site.module_path, SparseThresholdedActivation(act, threshold))
    model.set_submodule(down_path, sparse_down)
    return [site.module_path, down_path]


#: How each kind of MLP is wrapped (``ArchSpec.gated`` -> wrapper).
WRAPPERS: dict[bool, Callable[[nn.Module, ActivationSite, float, SparseMLPConfig], list[str]]] = {
    True: _wrap_gated,
    False: _wrap_act_down,
}


def _per_site(thresholds: Thresholds | Mapping[str, float] | float, sites: list[ActivationSite]) -> dict[str, float]:
    names = [s.name for s in sites]
    if isinstance(thresholds, Thresholds):
        if thresholds.site != "act":
            raise ValueError(
                f"sparsify_mlps_ thresholds the activation output (site 'act'); these thresholds were "
                f"calibrated at site {thresholds.site!r}: calibrate with CalibrationConfig(site='act')"
            )
        thresholds = thresholds.values
    if isinstance(thresholds, Mapping):
        missing = [n for n in names if n not in thresholds]
        unknown = sorted(set(thresholds) - set(names))
        if missing or unknown:
            raise ValueError(
                f"thresholds must have one entry per layer {names}; missing {missing}, unknown {unknown}"
            )
        return {n: _check_threshold(thresholds[n]) for n in names}
    return {n: _check_threshold(thresholds) for n in names}


def sparsify_mlps_(
    model: nn.Module, thresholds: Thresholds | Mapping[str, float] | float, config: SparseMLPConfig = DEFAULT_CONFIG
) -> list[str]:
    """Wrap every MLP of ``model`` (in place) with the activation-sparse operator.

    Args:
        model: a ``transformers`` model of a registered architecture (see :mod:`deftune.arch`).
        thresholds: one float for every layer, ``{site name: t_l}`` for every layer, or calibrated
            :class:`deftune.sparse.Thresholds` of site ``act``.
        config: backend / scheme choice of the operator.

    Returns:
        The module paths that were replaced.

    Raises:
        ValueError: a threshold is missing, unknown, negative or not finite, or the model is
            already sparsified.
        NotImplementedError: an MLP has a structure the wrappers do not support.
    """
    if any(isinstance(m, SparseWrapper) for m in model.modules()):
        raise ValueError("model is already sparsified; call restore_mlps_(model) first or set .threshold")
    sites = find_activation_sites(model, "act")
    per_site = _per_site(thresholds, sites)
    wrap = WRAPPERS[arch_spec(model).gated]
    replaced: list[str] = []
    try:
        for site in sites:
            replaced += wrap(model, site, per_site[site.name], config)
    except Exception:
        restore_mlps_(model)  # leave the model as it was
        raise
    return replaced


def restore_mlps_(model: nn.Module) -> int:
    """Put back every module wrapped by :func:`sparsify_mlps_`; returns how many were restored."""
    wrapped = [(name, m) for name, m in model.named_modules() if isinstance(m, SparseWrapper)]
    for name, module in wrapped:
        model.set_submodule(name, module.base)
    return len(wrapped)


def sparse_modules(model: nn.Module) -> dict[str, SparseWrapper]:
    """The wrappers installed in ``model`` by module path (to read or set ``.threshold``)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SparseWrapper)}
