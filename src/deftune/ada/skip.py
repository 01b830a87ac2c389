"""Remove MLP blocks at inference: skip policies, the ``skip_mlps_`` verb, save and reload.

Typical use::

    plan = plan_skip(model, SkipConfig(policy="gate", tau=0.5), gates=gate_values)
    report = skip_mlps_(model, plan)        # blocks replaced by residual pass-throughs, weights freed
    save_skipped(model, "out/skipped", plan, tokenizer)
    model, plan = load_skipped("out/skipped")   # the removed weights are never allocated

Policies (registry :data:`SKIP_POLICIES`, add one with :func:`register_skip_policy`) map per-block
scores to the names of the blocks to remove:

* ``gate``    — learned ADA-DEFT gate ``g_l < tau``;
* ``density`` — measured activation density ``rho_l < tau_density`` (training-free: any model);
* ``topk``    — keep the ``keep`` blocks with the highest score (gate or density), skip the rest.

The kept blocks' gates are folded into their down projections (``W <- g W``, ``b <- g b``), so a
skipped model computes exactly what the gated model computed with the removed gates set to 0.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from deftune.ada.config import SkipConfig
from deftune.ada.wrappers import check_foldable, fold_scale_, gate_path, set_submodule, skip_replacements
from deftune.arch import ActivationSite, find_activation_sites

PLAN_FILE = "skip.json"
WEIGHTS_FILE = "weights.safetensors"  # not model.safetensors: from_pretrained must not half-load it


# ---- plans -------------------------------------------------------------------------------------


@dataclass
class SkipPlan:
    """Which blocks to remove and which gates to fold into the kept ones.

    Attributes:
        skip: names of the removed blocks (``"encoder.3"``), in forward order.
        scales: gate value folded into each kept block's down projection (1.0 entries omitted).
        scores: the per-block score the policy looked at (gate or density), for the record.
        policy: the :class:`SkipConfig` that produced the plan, as a dict.
        blocks: all block names of the model, in forward order.
    """

    skip: list[str]
    scales: dict[str, float] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)
    policy: dict = field(default_factory=dict)
    blocks: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> SkipPlan:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


PolicyFn = Callable[[SkipConfig, dict[str, float]], list[str]]
SKIP_POLICIES: dict[str, PolicyFn] = {}


def register_skip_policy(name: str) -> Callable[[PolicyFn], PolicyFn]:
    """Decorator: register ``fn(config, scores) -> names to skip`` under ``name``."""

    def deco(fn: PolicyFn) -> PolicyFn:
        SKIP_POLICIES[name] = fn
        return fn

    return deco


@register_skip_policy("gate")
def _by_gate(config: SkipConfig, scores: dict[str, float]) -> list[str]:
    return [name for name, g in scores.items() if g < config.tau]


@register_skip_policy("density")
def _by_density(config: SkipConfig, scores: dict[str, float]) -> list[str]:
    return [name for name, rho in scores.items() if rho < config.tau_density]


@register_skip_policy("topk")
def _keep_top_k(config: SkipConfig, scores: dict[str, float]) -> list[str]:
    order = list(scores)
    # highest score first; ties keep the earlier block (stable sort)
    ranked = sorted(order, key=lambda name: -scores[name])
    kept = set(ranked[: config.keep])
    return [name for name in order if name not in kept]


def block_sites(model: nn.Module, site: str = "act") -> list[ActivationSite]:
    """The MLP blocks of ``model`` (one activation site each), in forward order."""
    return find_activation_sites(model, site)  # type: ignore[arg-type]


def plan_skip(
    model: nn.Module,
    config: SkipConfig,
    *,
    gates: Mapping[str, float] | None = None,
    density: Mapping[str, float] | None = None,
) -> SkipPlan:
    """Choose the blocks to remove.

    Args:
        model: the model (used for the list of blocks).
        config: the policy.
        gates: learned inference gates per block name (ADA-DEFT); needed by ``gate`` policies,
            and folded into the kept blocks when given.
        density: measured density per block name (see :func:`density_scores`); needed by
            ``density`` policies.
    """
    names = [s.name for s in block_sites(model)]
    if config.needs_gates and gates is None:
        raise ValueError(
            f"policy {config.policy!r} (score {config.score!r}) needs learned gates: pass gates=..., "
            "or use policy='density' (training-free)"
        )
    if config.needs_density and density is None:
        raise ValueError(f"policy {config.policy!r} needs measured density: pass density=...")
    source = gates if config.needs_gates else density
    assert source is not None
    missing = [n for n in names if n not in source]
    if missing:
        raise ValueError(f"no score for blocks {missing}; scores given for {sorted(source)}")
    eligible = [n for n in names if not config.stacks or n.split(".")[0] in config.stacks]
    scores = {n: float(source[n]) for n in eligible}
    skip = set(SKIP_POLICIES[config.policy](config, scores))
    skip_list = [n for n in names if n in skip]
    scales = {}
    if gates is not None:
        scales = {n: float(gates[n]) for n in names if n not in skip and float(gates[n]) != 1.0}
    return SkipPlan(
        skip=skip_list,
        scales=scales,
        scores={n: float(source[n]) for n in names},
        policy=asdict(config),
        blocks=names,
    )


def density_scores(
    model: nn.Module, batches: Iterable[Mapping], threshold: float | None = None
) -> dict[str, float]:
    """Per-block activation density from :func:`deftune.density.measure_density`.

    ``threshold=None`` gives the exact density (fraction of non-zero activations), a float the
    fraction with ``|a| > threshold``.
    """
    from deftune.density import measure_density

    thresholds = () if threshold is None else (threshold,)
    result = measure_density(model, batches, thresholds=thresholds)
    if threshold is None:
        return result.exact_per_layer
    key = f"{threshold:g}"
    return {name: layer.thresholded[key] for name, layer in result.per_layer.items()}


# ---- the verb ----------------------------------------------------------------------------------


@dataclass
class SkipReport:
    """What :func:`skip_mlps_` did."""

    skipped: list[str]
    kept: list[str]
    param_bytes_before: int
    param_bytes_after: int

    @property
    def param_bytes_saved(self) -> int:
        return self.param_bytes_before - self.param_bytes_after


def param_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters (each shared tensor counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    return total


def skip_mlps_(model: nn.Module, plan: SkipPlan, *, fold_gates: bool = True) -> SkipReport:
    """Remove the planned MLP blocks from ``model`` in place and fold the kept blocks' gates.

    Removed blocks are replaced by weightless modules returning the residual (see
    :mod:`deftune.ada.wrappers`); their weights are released. The model must be a plain
    ``transformers`` model to fold gates (merge ``peft`` adapters first).
    """
    sites = {s.name: s for s in block_sites(model)}
    unknown = [n for n in list(plan.skip) + list(plan.scales) if n not in sites]
    if unknown:
        raise ValueError(f"blocks {unknown} are not MLP blocks of this model; it has {list(sites)}")
    before = param_bytes(model)
    # everything that can fail runs before the model is changed: rules, then foldability
    replacements: dict[str, nn.Module] = {}
    for name in plan.skip:  # collect first: rules read modules that later swaps remove
        replacements.update(skip_replacements(model, sites[name]))
    folds = {}
    if fold_gates:
        folds = {name: model.get_submodule(gate_path(model, sites[name]))
                 for name in plan.scales if name not in plan.skip}
        for module in folds.values():
            check_foldable(module)
    for name, module in folds.items():
        fold_scale_(module, plan.scales[name])
    for path, module in replacements.items():
        set_submodule(model, path, module)
    kept = [n for n in sites if n not in plan.skip]
    return SkipReport(list(plan.skip), kept, before, param_bytes(model))


# ---- save / reload -----------------------------------------------------------------------------


def save_skipped(model: nn.Module, out_dir: str | os.PathLike, plan: SkipPlan, tokenizer=None) -> Path:
    """Save a skipped ``transformers`` model: config, weights (removed blocks absent), plan.

    Every tensor of the model is written once (parameters, persistent and non-persistent
    buffers); tensors shared between names (tied embeddings) are recorded as aliases.
    Reload with :func:`load_skipped` (``from_pretrained`` refuses the folder: there is no
    ``model.safetensors``, so removed blocks can never be silently re-initialised at random).
    """
    from deftune.runs import write_json_atomic, write_safetensors_atomic

    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        raise TypeError(
            f"save_skipped needs a transformers model, got {type(model).__name__} (merge peft first)"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    owner: dict[int, str] = {}
    named = list(model.named_parameters(remove_duplicate=False)) + list(
        model.named_buffers(remove_duplicate=False)
    )
    for key, tensor in named:
        if tensor is None:
            continue
        ident = id(tensor)
        if ident in owner:
            aliases[key] = owner[ident]
            continue
        owner[ident] = key
        tensors[key] = tensor.detach().contiguous().cpu()
    write_safetensors_atomic(out / WEIGHTS_FILE, tensors, metadata={"format": "pt"})
    config.architectures = [type(model).__name__]
    config.save_pretrained(out)
    manifest = {"plan": plan.to_dict(), "aliases": aliases, "class": type(model).__name__}
    write_json_atomic(out / PLAN_FILE, manifest)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def _assign(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    path, _, name = key.rpartition(".")
    module = model.get_submodule(path) if path else model
    if name in module._parameters:
        module._parameters[name] = nn.Parameter(tensor, requires_grad=False)
    elif name in module._buffers:
        module._buffers[name] = tensor
    else:
        raise KeyError(f"{key}: the rebuilt model has no parameter or buffer of that name")


def load_skipped(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, SkipPlan]:
    """Rebuild a model saved by :func:`save_skipped`, in eval mode.

    The model is built on the meta device, the plan's blocks are swapped out, and only the saved
    tensors are materialised — the removed weights are never allocated.
    """
    import transformers
    from safetensors.torch import load_file

    root = Path(path)
    manifest_path = root / PLAN_FILE
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} not found: is {root} a folder written by save_skipped?")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    plan = SkipPlan.from_dict(manifest["plan"])
    config = transformers.AutoConfig.from_pretrained(root)
    cls = getattr(transformers, manifest["class"])
    with torch.device("meta"):
        model = cls(config)
    skip_mlps_(model, SkipPlan(skip=plan.skip), fold_gates=False)  # gates were folded before saving
    for key, tensor in load_file(str(root / WEIGHTS_FILE), device=str(device)).items():
        _assign(model, key, tensor)
    for alias, source in manifest["aliases"].items():
        src_path, _, src_name = source.rpartition(".")
        src_module = model.get_submodule(src_path) if src_path else model
        value = src_module._parameters.get(src_name, src_module._buffers.get(src_name))
        dst_path, _, dst_name = alias.rpartition(".")
        dst = model.get_submodule(dst_path) if dst_path else model
        if dst_name in dst._parameters:
            dst._parameters[dst_name] = value
        else:
            dst._buffers[dst_name] = value
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(
            f"{root}: tensors {left[:5]}… were not in {WEIGHTS_FILE}; the folder is incomplete"
        )
    model.eval()
    return model, plan


def skipped_block_names(model: nn.Module) -> list[str]:
    """Names of the blocks of ``model`` already replaced by skip wrappers."""
    names = []
    for module in model.modules():
        block = getattr(module, "block", None)
        if isinstance(block, str) and block and type(module).__module__ == "deftune.ada.wrappers":
            names.append(block)
    return sorted(set(names), key=lambda n: (n.split(".")[0] != "encoder", int(n.split(".")[1])))
