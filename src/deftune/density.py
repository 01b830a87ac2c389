"""Streaming activation-density measurement.

:class:`ActivationRecorder` attaches forward hooks to every MLP activation site (see
:mod:`deftune.arch`), and for every forward pass

* accumulates per-layer counts (exact non-zeros in fp32, ``|a| > tau`` for each threshold,
  positives) over *real* tokens — never storing activations;
* optionally computes a differentiable per-layer density surrogate (``loss_fn``) used by the
  DEFT regulariser (:mod:`deftune.regularizer`).

Hooks are removed on ``__exit__``, also when the body raises.

Which tokens are real: the recorder reads ``attention_mask`` (and, for encoder–decoder models,
``decoder_attention_mask`` or ``labels != -100``) from the keyword arguments of the innermost
``transformers`` model's forward call — after ``peft`` has extended the mask for virtual tokens.
An activation of shape ``(B, T, F)`` uses the last ``T`` columns of the ``(B, T_mask)`` mask
(right-aligned: this covers KV-cache decoding and prefix tuning); OPT's flattened ``(B*T, F)``
activations use the flattened mask. ``count_padding=True`` counts every position, as the
official DEFT code does.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from deftune.arch import ActivationSite, SiteKind, Stack, find_activation_sites

DEFAULT_THRESHOLDS: tuple[float, ...] = (1e-3, 1e-2)


# ---- accumulated counts ------------------------------------------------------------------------


@dataclass
class SiteCounts:
    """Running counts for one site (all over real tokens × features)."""

    elements: int = 0
    tokens: int = 0
    nonzero: int = 0
    positive: int = 0
    above: list[int] = field(default_factory=list)  # one per threshold

    def add(self, a: Tensor, mask: Tensor | None, thresholds: Sequence[float]) -> None:
        # a: (..., F); mask: bool over a.shape[:-1] (None: every position counts)
        a = a.detach()
        a = a[mask] if mask is not None else a.reshape(-1, a.shape[-1])  # (N_real, F)
        if a.numel() == 0:
            return
        a = a.float()
        self.tokens += a.shape[0]
        self.elements += a.numel()
        self.nonzero += int(torch.count_nonzero(a))
        self.positive += int((a > 0).sum())
        mag = a.abs()
        if not self.above:
            self.above = [0] * len(thresholds)
        for i, tau in enumerate(thresholds):
            self.above[i] += int((mag > tau).sum())


@dataclass
class LayerDensity:
    """Density of one layer. Fractions are in [0, 1]."""

    stack: str
    exact: float
    positive: float
    thresholded: dict[str, float]
    tokens: int
    features: int


@dataclass
class DensityResult:
    """Per-layer, per-stack and overall activation density.

    ``exact`` is the fraction of activations that are not exactly zero (in the dtype the model
    ran in; fp32 for the paper's metric), ``thresholded[str(tau)]`` the fraction with
    ``|a| > tau``, ``positive`` the fraction ``> 0``. Stack and overall values are weighted by
    element count.
    """

    per_layer: dict[str, LayerDensity]
    per_stack: dict[str, float]
    overall: float
    thresholds: tuple[float, ...]
    count_padding: bool
    dtype: str
    site: str

    # -- derived views
    @property
    def exact_per_layer(self) -> dict[str, float]:
        return {name: layer.exact for name, layer in self.per_layer.items()}

    def thresholded_overall(self, tau: float) -> float:
        key = _tau_key(tau)
        total = sum(layer.tokens * layer.features for layer in self.per_layer.values())
        hit = sum(
            layer.thresholded[key] * layer.tokens * layer.features for layer in self.per_layer.values()
        )
        return hit / max(total, 1)

    # -- serialisation
    def to_dict(self) -> dict:
        out = asdict(self)
        out["thresholds"] = list(self.thresholds)
        return out

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, data: Mapping) -> DensityResult:
        data = dict(data)
        data["per_layer"] = {k: LayerDensity(**v) for k, v in data["per_layer"].items()}
        data["thresholds"] = tuple(data["thresholds"])
        return cls(**data)

    def table(self, title: str = "Activation density") -> str:
        """A plain-text table (one row per layer)."""
        taus = [_tau_key(t) for t in self.thresholds]
        head = f"{'layer':<12}{'exact':>8}{'positive':>10}" + "".join(f"{'|a|>' + t:>12}" for t in taus)
        lines = [title, head, "-" * len(head)]
        for name, layer in self.per_layer.items():
            lines.append(
                f"{name:<12}{layer.exact:>8.4f}{layer.positive:>10.4f}"
                + "".join(f"{layer.thresholded[t]:>12.4f}" for t in taus)
            )
        lines.append("-" * len(head))
        for stack, value in self.per_stack.items():
            lines.append(f"{stack + ' (all)':<12}{value:>8.4f}")
        lines.append(f"{'overall':<12}{self.overall:>8.4f}")
        return "\n".join(lines)


def _tau_key(tau: float) -> str:
    return f"{tau:g}"


# ---- mask alignment ----------------------------------------------------------------------------


def align_mask(mask: Tensor | None, activation: Tensor) -> Tensor | None:
    """Boolean mask over the leading dims of ``activation`` (``a.shape[:-1]``), or ``None``.

    Right-aligns a ``(B, T_mask)`` mask to an activation ``(B, T, F)`` with ``T <= T_mask``, and to a
    flattened ``(B*T, F)`` one (OPT's MLP; ``T`` < ``T_mask`` in cached decoding), batch-major.
    Returns ``None`` (count all) when shapes don't fit.
    """
    if mask is None:
        return None
    lead = activation.shape[:-1]
    mask = mask.to(device=activation.device).bool()
    if mask.dim() != 2:
        return mask.reshape(-1) if len(lead) == 1 and mask.numel() == lead[0] else None
    batch, width = mask.shape
    if len(lead) == 2 and lead[0] == batch and lead[1] <= width:
        return mask[:, width - lead[1] :]
    if len(lead) == 1 and lead[0] % batch == 0 and lead[0] // batch <= width:
        return mask[:, width - lead[0] // batch :].reshape(-1)  # (B*T,)
    return None


def stack_masks(inputs: Mapping[str, Any], is_encoder_decoder: bool) -> dict[str, Tensor | None]:
    """Real-token masks of a forward call's keyword ``inputs``, per stack (``encoder`` / ``decoder``).

    Decoder-only and encoder models: ``attention_mask`` for both. Encoder–decoder models: the
    decoder's tokens are ``decoder_attention_mask``; else ``labels != -100`` for token labels
    ``(B, T)``; else, when the decoder input is built from ``input_ids`` shifted right (no
    ``decoder_input_ids``: T5's classification head), the encoder mask shifted right with the start
    token real; else unknown (``None``: count all).
    """
    attention = inputs.get("attention_mask")
    if not is_encoder_decoder:
        return {"encoder": attention, "decoder": attention}
    decoder = inputs.get("decoder_attention_mask")
    labels = inputs.get("labels")
    if decoder is None and isinstance(labels, Tensor) and labels.dim() == 2:
        decoder = labels != -100
    elif decoder is None and inputs.get("decoder_input_ids") is None and isinstance(attention, Tensor):
        start = torch.ones_like(attention[:, :1])
        decoder = torch.cat([start, attention[:, :-1]], dim=1)  # (B, T): shift_right(attention)
    return {"encoder": attention, "decoder": decoder}


def module_stack(name: str, is_encoder_decoder: bool) -> Stack:
    """The stack a module of an encoder–decoder model belongs to, from its path; ``encoder`` otherwise."""
    return "decoder" if is_encoder_decoder and re.search(r"(^|\.)decoder\.", name) else "encoder"


# ---- recorder ----------------------------------------------------------------------------------


def _innermost_hf_model(model: nn.Module) -> nn.Module:
    from transformers import PreTrainedModel

    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            return module
    return model


def _recomputing() -> bool:
    """True while autograd runs a backward pass: a forward seen then is gradient checkpointing
    recomputing a block, already counted (and its loss taken) in the real forward."""
    return torch._C._current_graph_task_id() != -1


class ActivationRecorder:
    """Context manager that hooks every MLP activation site of a model.

    Works with (non-re-entrant) gradient checkpointing: the forward that autograd re-runs during
    backward is not counted again. Feed-forward chunking (``chunk_size_feed_forward``) is refused.

    Args:
        model: a ``transformers`` model (optionally wrapped by ``peft``).
        sites: activation sites; default :func:`deftune.arch.find_activation_sites`.
        site: ``"act"`` or ``"product"`` (gated MLPs), used when ``sites`` is None.
        thresholds: ``tau`` values for the thresholded density ``|a| > tau``.
        count_padding: count padding tokens too (the official DEFT code's convention).
        loss_fn: elementwise density surrogate; when set, each forward stores a per-site
            differentiable mean in :attr:`losses` (popped with :meth:`pop_losses`).
        track_stats: accumulate counts (turn off to save time when only the loss is needed).
        skip_leading: positions at the start of each sequence to exclude (prompt-tuning virtual
            tokens), applied after alignment; for encoder–decoder models in the encoder only (the
            virtual tokens lead the encoder input).

    Example::

        with ActivationRecorder(model) as rec:
            model(**batch)
        print(rec.result().table())
    """

    #: Input sites are hooked before the module's existing pre-hooks (True) or after them (False,
    #: the default: what the module really receives, e.g. after an input threshold).
    inputs_first: bool = False

    def __init__(
        self,
        model: nn.Module,
        sites: Sequence[ActivationSite] | None = None,
        *,
        site: SiteKind = "act",
        thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
        count_padding: bool = False,
        loss_fn: Callable[[Tensor], Tensor] | None = None,
        track_stats: bool = True,
        skip_leading: int = 0,
    ) -> None:
        for tau in thresholds:
            if not (isinstance(tau, (int, float)) and tau >= 0 and math.isfinite(tau)):
                raise ValueError(f"thresholds must be finite and >= 0, got {tau!r}")
        if not isinstance(skip_leading, int) or isinstance(skip_leading, bool) or skip_leading < 0:
            raise ValueError(f"skip_leading must be an int >= 0, got {skip_leading!r}")
        self.model = model
        self.sites = list(sites) if sites is not None else find_activation_sites(model, site)
        self.site_kind = site
        self.thresholds = tuple(float(t) for t in thresholds)
        self.count_padding = count_padding
        self.loss_fn = loss_fn
        self.track_stats = track_stats
        self.skip_leading = skip_leading
        self.counts: dict[str, SiteCounts] = {s.name: SiteCounts() for s in self.sites}
        self.features: dict[str, int] = {}
        self.losses: dict[str, Tensor] = {}
        self.enabled = True
        self._masks: dict[str, Tensor | None] = {}
        self._enc_dec = bool(getattr(getattr(_innermost_hf_model(model), "config", None), "is_encoder_decoder", False))
        self._dtype: str = ""
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._warned = False

    # -- life cycle
    def __enter__(self) -> ActivationRecorder:
        self.attach()
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def attach(self) -> None:
        if self._handles:
            raise RuntimeError("ActivationRecorder is already attached")
        chunked = sorted({n for n, m in self.model.named_modules() if getattr(m, "chunk_size_feed_forward", 0)})
        if chunked:
            raise ValueError(
                f"feed-forward chunking is on ({chunked[0]}.chunk_size_feed_forward > 0): the MLP then runs on "
                "slices of the sequence, which the per-token masks cannot follow; set "
                "model.config.chunk_size_feed_forward = 0 (and each layer's chunk_size_feed_forward) first"
            )
        modules = dict(self.model.named_modules())
        self.losses.clear()
        try:
            root = _innermost_hf_model(self.model)
            self._handles.append(root.register_forward_pre_hook(self._capture_masks, with_kwargs=True))
            # peft's own SEQ_CLS prefix path (a user's get_peft_model, transformers < 5.24) calls the
            # backbone (model.bert) directly, bypassing the task model
            backbone = getattr(root, "base_model", root)
            if backbone is not root and not getattr(root.config, "is_encoder_decoder", False):
                self._handles.append(backbone.register_forward_pre_hook(self._capture_masks, with_kwargs=True))
            for s in self.sites:
                module = modules.get(s.module_path)
                if module is None:
                    raise KeyError(f"activation site {s.name}: no module named {s.module_path!r}")
                if s.hook == "output":
                    handle = module.register_forward_hook(self._make_output_hook(s))
                else:
                    handle = module.register_forward_pre_hook(self._make_input_hook(s), prepend=self.inputs_first)
                self._handles.append(handle)
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._masks.clear()

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    # -- masks
    def set_masks(self, attention_mask: Tensor | None, decoder_mask: Tensor | None = None) -> None:
        """Set the real-token masks for calls that bypass the Hugging Face model's ``forward``
        (e.g. running a stack directly). The next HF ``forward`` call replaces them. For models that
        are not encoder–decoders ``decoder_mask`` defaults to ``attention_mask`` (their sites are
        one stack, named ``decoder`` for decoder-only models)."""
        if decoder_mask is None and not self._enc_dec:
            decoder_mask = attention_mask
        self._masks = {"encoder": attention_mask, "decoder": decoder_mask}

    def _capture_masks(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        attention = kwargs.get("attention_mask")
        if attention is None and len(args) > 1 and isinstance(args[1], Tensor):
            attention = args[1]  # positional (input_ids, attention_mask, ...)
        self._masks = stack_masks({**kwargs, "attention_mask": attention},
                                  getattr(module.config, "is_encoder_decoder", False))

    def _real_mask(self, site: ActivationSite, a: Tensor) -> Tensor | None:
        if self.count_padding:
            mask = None
        else:
            mask = align_mask(self._masks.get(site.stack), a)
            if mask is None and self._masks.get(site.stack) is not None and not self._warned:
                warnings.warn(
                    f"attention mask {tuple(self._masks[site.stack].shape)} does not fit activation "
                    f"{tuple(a.shape)} at {site.name}; counting all positions",
                    stacklevel=2,
                )
                self._warned = True
        if self.skip_leading and (site.stack == "encoder" or not self._enc_dec):
            lead = self._after_leading(a)
            mask = lead if mask is None or lead is None else mask & lead
        return mask

    def _after_leading(self, a: Tensor) -> Tensor | None:
        """Mask over ``a.shape[:-1]`` excluding each sequence's first ``skip_leading`` positions;
        ``None`` for a flattened activation whose batch size no mask tells."""
        if a.dim() == 3:
            lead = torch.ones(a.shape[:-1], dtype=torch.bool, device=a.device)  # (B, T)
            lead[:, : self.skip_leading] = False
            return lead
        batch = next((m.shape[0] for m in self._masks.values() if isinstance(m, Tensor) and m.dim() == 2), None)
        if a.dim() != 2 or batch is None or a.shape[0] % batch:
            return None
        lead = torch.ones(batch, a.shape[0] // batch, dtype=torch.bool, device=a.device)  # (B, T)
        lead[:, : self.skip_leading] = False
        return lead.reshape(-1)  # (B*T,) batch-major, as OPT flattens

    # -- hooks
    def _make_output_hook(self, site: ActivationSite):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            # a module may hand the density loss a view of its output with another gradient path
            # (deftune.act_scale.ScaledActivation with density-only scales); same values
            view = getattr(module, "density_output", None) if self.loss_fn is not None else None
            self._record(site, view(args[0], output) if view is not None else output)

        return hook

    def _make_input_hook(self, site: ActivationSite):
        def hook(module: nn.Module, args: tuple) -> None:
            self._record(site, args[0])

        return hook

    def _record(self, site: ActivationSite, a: Tensor) -> None:
        if not self.enabled:
            return
        recomputing = _recomputing()
        mask = self._real_mask(site, a)
        self.features[site.name] = a.shape[-1]
        self._dtype = str(a.dtype).replace("torch.", "")
        if self.track_stats and not recomputing:
            self.counts[site.name].add(a, mask, self.thresholds)
        if self.loss_fn is not None and torch.is_grad_enabled():
            # select real tokens first: the surrogate never runs on padding (cheaper than masking)
            real = a[mask] if mask is not None else a.reshape(-1, a.shape[-1])  # (N_real, F)
            if real.numel():
                loss = self.loss_fn(real).mean()  # recomputed too: checkpointing wants the same saved tensors
                if not recomputing:
                    self.losses[site.name] = loss

    # -- results
    def pop_losses(self) -> dict[str, Tensor]:
        """Per-site surrogate losses of the last forward pass(es); clears them."""
        losses, self.losses = self.losses, {}
        return losses

    def reset(self) -> None:
        self.counts = {s.name: SiteCounts() for s in self.sites}

    def all_reduce(self) -> None:
        """Sum counts over ``torch.distributed`` processes (no-op when not initialised)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        names = [s.name for s in self.sites]
        n_tau = len(self.thresholds)
        rows = []
        for name in names:
            c = self.counts[name]
            above = c.above or [0] * n_tau
            rows.append([c.elements, c.tokens, c.nonzero, c.positive, *above])
        backend = dist.get_backend()
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else "cpu"
        # float64 holds integers exactly up to 2**53: enough for any count we make
        packed = torch.tensor(rows, dtype=torch.float64, device=device)
        dist.all_reduce(packed)
        for name, row in zip(names, packed.cpu().tolist()):
            ints = [int(round(v)) for v in row]
            self.counts[name] = SiteCounts(*ints[:4], above=ints[4:])

    def result(self) -> DensityResult:
        """The accumulated density as a :class:`DensityResult`."""
        per_layer: dict[str, LayerDensity] = {}
        stack_elems: dict[str, list[int]] = {}
        for s in self.sites:
            c = self.counts[s.name]
            if c.elements == 0:
                continue
            e = c.elements
            per_layer[s.name] = LayerDensity(
                stack=s.stack,
                exact=c.nonzero / e,
                positive=c.positive / e,
                thresholded={_tau_key(t): c.above[i] / e for i, t in enumerate(self.thresholds)},
                tokens=c.tokens,
                features=self.features.get(s.name, e // max(c.tokens, 1)),
            )
            acc = stack_elems.setdefault(s.stack, [0, 0])
            acc[0] += c.nonzero
            acc[1] += e
        if not per_layer:
            raise RuntimeError(
                "no activations were recorded: run at least one forward pass with real tokens "
                "inside the recorder"
            )
        per_stack = {k: v[0] / v[1] for k, v in stack_elems.items()}
        total_nz = sum(v[0] for v in stack_elems.values())
        total = sum(v[1] for v in stack_elems.values())
        return DensityResult(
            per_layer=per_layer,
            per_stack=per_stack,
            overall=total_nz / total,
            thresholds=self.thresholds,
            count_padding=self.count_padding,
            dtype=self._dtype,
            site=self.site_kind,
        )


# ---- one-call measurement ----------------------------------------------------------------------


def to_device(batch: Mapping[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """``batch`` with its tensors moved to ``device`` (other values kept)."""
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def measure_density(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    *,
    sites: Sequence[ActivationSite] | None = None,
    site: SiteKind = "act",
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    count_padding: bool = False,
    count_virtual_tokens: bool = False,
    progress: bool = False,
    description: str = "measuring density",
) -> DensityResult:
    """Run ``model`` over ``batches`` (dicts of model inputs) and measure MLP activation density.

    The model is put in eval mode for the measurement and restored afterwards. Density is the
    fraction of activations that are exactly non-zero, counted over real tokens (see
    :class:`ActivationRecorder`): not padding (``count_padding`` counts it) and not the virtual
    tokens of prompt / P-tuning (``count_virtual_tokens`` counts them; the official DEFT code
    counts both). Activations are counted in the dtype the model runs in: run it in fp32 for the
    paper's metric (bf16 rounds small GELU/SiLU outputs to zero and changes the count).
    """
    from deftune.methods import virtual_token_count

    device = next(model.parameters()).device
    was_training = model.training
    skip = 0 if count_virtual_tokens else virtual_token_count(model)
    model.eval()
    try:
        with ActivationRecorder(
            model, sites, site=site, thresholds=thresholds, count_padding=count_padding, skip_leading=skip
        ) as rec:
            iterator = batches
            if progress:
                from deftune.progress import track

                iterator = track(batches, description=description)
            for batch in iterator:
                model(**to_device(batch, device))
            rec.all_reduce()
            return rec.result()
    finally:
        model.train(was_training)
