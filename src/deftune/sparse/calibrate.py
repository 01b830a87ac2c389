"""Calibrated activation thresholds: make a target fraction of MLP activations exactly zero.

For each MLP activation site ``l`` (:func:`deftune.arch.find_activation_sites`; ``site="act"``: for
gated MLPs the *activated gate* ``act(W_gate x)``) we pick a threshold ``t_l`` so that on
calibration data a fraction ``target`` of activations satisfies ``|a| > t_l``; at inference every
``|a| <= t_l`` becomes an exact 0. For gated MLPs the product ``act(gate) * up`` then has zeros in the
same places, so the rows of ``W_up`` and ``W_down`` they multiply can be skipped. ``site="product"``
thresholds the product itself, i.e. the input of the down projection (TEAL's choice): the zeros skip
rows of ``W_down`` only, but ``|act(gate) * up|`` measures what each entry contributes, so the same
density costs far less quality (SmolLM2 at density 0.58: perplexity 21.2 -> 21.3, against 25.6 at
the activated gate; ``docs/generative.md``). Output sites are thresholded by wrapping their module
(:class:`ThresholdedActivation`), input sites by a forward pre-hook on the down projection
(:class:`InputThreshold`), which leaves adapters on that layer (peft LoRA on ``down_proj``) and
state-dict keys untouched; both live in :mod:`deftune.sparse.thresholds` with the rest of the run-time
side. This is the post-hoc
thresholding of e.g. CATS (Lee et al., 2024, arXiv 2404.08763) and TEAL (Liu et al., 2024, arXiv
2408.14690); it pairs naturally with DEFT (Runwal et al., AAAI 2025, arXiv 2402.01911), whose
trained near-zeros cost little when they become exact zeros.

Usage::

    th = calibrate_thresholds(model, batches, CalibrationConfig(target=0.3))   # batches: a list
    th.save("thresholds.json")                                 # Thresholds.load(...) reads it back
    with thresholded(model, th):                               # or apply_thresholds / remove_thresholds
        model(**batch)

**Depth.** Thresholding layer ``l`` changes the inputs of every later layer, so thresholds chosen
on the dense model undershoot the target in deep layers (MiniLM, target 0.1: the last layers land
near 0.05). :func:`calibrate_thresholds` therefore makes ``refine_passes`` extra passes, each
histogramming every layer *before its own threshold* with the current thresholds of all layers
applied; after ``p`` passes the first ``p + 1`` layers are exact on the calibration data and the
rest close (a fixed-point iteration that equals layer-by-layer greedy calibration after ``L``
passes). :func:`collect_histograms` alone gives the single-pass histograms, from which
``hist.thresholds(target)`` serves any target without new passes.

**Quantile estimate.** Storing all activations is out of the question (SmolLM2: 30 layers x 1,536
features per token), so each layer keeps a fixed-bin histogram of ``|a|`` whose bin edges are
``0`` and ``2**(k / bins_per_octave)`` for ``min_log2 <= k / bins_per_octave <= max_log2`` (log-spaced:
activations span many decades, and a *relative* resolution is what a threshold needs). Values are
binned with ``torch.bucketize`` against the float32 edges, so a bin holds ``(e_{k-1}, e_k]``, and
thresholds are always chosen *on an edge*. Two consequences:

* the per-layer density reported on calibration data (``Thresholds.achieved``) is exact — it is
  the count of ``|a| > t`` over real tokens, not an interpolation;
* the only calibration error is granularity: ``|achieved - target|`` is at most half the mass of the
  bin that holds the quantile (we take the nearer edge), and ``t`` is within a factor
  ``2**(1/bins_per_octave)`` (0.27 % at the default 256) of the exact empirical quantile. Mass
  concentrates into one bin only where many activations share nearly the same value, e.g. exact
  zeros of ReLU (an explicit bin) or GELU's minimum ``-0.17``.

A reservoir sample would also work, but its error is statistical (``sqrt(d(1-d)/n)``, 0.0015 for
``n = 10**5``), it needs a random generator and it cannot give the exact achieved density; the
histogram is deterministic, ~115 KB per layer, and merges by addition (data-parallel friendly).
Held-out density differs from the calibration value by sampling error of the data itself; measure
it on held-out data (the wrappers make zeros exact, so :func:`deftune.density.measure_density`
counts it directly).

**Modes.** ``layer``: every layer reaches ``target`` on its own. ``global``: one threshold shared by
all layers (one rank over all activations pooled), chosen so the *overall* density reaches
``target``; layers whose activations are smaller become sparser than others. ``energy``: every
layer loses the same fraction of its activation energy ``sum a**2`` (equal signal-to-noise of the
thresholding error, layer by layer), that fraction chosen so the *overall* density reaches
``target``; layers whose mass sits in a few large values become sparser than layers whose
activations are spread evenly. Scale-free like ``layer`` (a layer scaled by ``c`` gets ``c·t``),
unlike ``global``. The energy is read from the histogram (each value counted at its bin's upper edge,
a relative error below ``2**(2/bins_per_octave) - 1``, 0.5 % at the default 256).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from deftune.arch import SITE_KINDS, ActivationSite, find_activation_sites
from deftune.density import ActivationRecorder, to_device
from deftune.sparse.thresholds import ThresholdedActivation, Thresholds, thresholded

# ---- configuration -----------------------------------------------------------------------------


@dataclass(frozen=True)
class CalibrationConfig:
    """How to calibrate thresholds.

    Attributes:
        target: fraction of activations to keep (``|a| > t``) per layer (``layer`` mode) or overall
            (``global`` mode), in (0, 1]; 1.0 gives ``t = 0`` (nothing changes).
        mode: ``layer`` (a threshold per layer, each at the target), ``global`` (one threshold) or
            ``energy`` (every layer loses the same fraction of its activation energy).
        bins_per_octave: histogram resolution: bins per factor of 2 in ``|a|``.
        min_log2: smallest non-zero bin edge is ``2**min_log2``.
        max_log2: largest bin edge is ``2**max_log2`` (larger values share one overflow bin).
        count_padding: also count padding positions (the official DEFT code's convention).
        site: ``act`` (the activation output) or ``product`` (gated MLPs: ``act(gate) * up``, the
            down projection's input; non-gated MLPs: the same as ``act``).
        refine_passes: extra calibration passes, each with the current thresholds applied, so that
            every layer is calibrated on inputs that earlier layers' thresholds already changed
            (after ``p`` passes the first ``p + 1`` layers are exact on the calibration data).
    """

    target: float = 0.5
    mode: str = "layer"
    bins_per_octave: int = 256
    min_log2: int = -40
    max_log2: int = 16
    count_padding: bool = False
    refine_passes: int = 2
    site: str = "act"

    def __post_init__(self) -> None:
        _check_target(self.target)
        if self.site not in SITE_KINDS:
            raise ValueError(f"site must be one of {list(SITE_KINDS)}, got {self.site!r}")
        if self.mode not in THRESHOLD_MODES:
            raise ValueError(f"mode must be one of {sorted(THRESHOLD_MODES)}, got {self.mode!r}")
        if not (isinstance(self.bins_per_octave, int) and not isinstance(self.bins_per_octave, bool)
                and 1 <= self.bins_per_octave <= 4096):
            raise ValueError(f"bins_per_octave must be an integer in [1, 4096], got {self.bins_per_octave!r}")
        if not (-126 <= self.min_log2 < self.max_log2 <= 127):
            raise ValueError(
                f"need -126 <= min_log2 < max_log2 <= 127 (float32 range), got {self.min_log2}, {self.max_log2}"
            )
        if not (isinstance(self.refine_passes, int) and not isinstance(self.refine_passes, bool)
                and self.refine_passes >= 0):
            raise ValueError(f"refine_passes must be an integer >= 0, got {self.refine_passes!r}")


def _check_target(target: float) -> float:
    if not (isinstance(target, (int, float)) and not isinstance(target, bool) and 0.0 < target <= 1.0):
        raise ValueError(f"target must be a density in (0, 1], got {target!r}")
    return float(target)


def check_threshold_options(density: float | None, mode: str, batches: int) -> None:
    """Validate a run config's ``act_threshold_density`` / ``_mode`` / ``_batches`` (GLUE and
    generative runs share them); raises ``ValueError`` naming the field and the accepted values."""
    if density is not None and not (isinstance(density, (int, float)) and not isinstance(density, bool)
                                    and 0 < density <= 1):
        raise ValueError(f"act_threshold_density must be in (0, 1] or None, got {density!r}")
    if mode not in THRESHOLD_MODES:
        raise ValueError(f"act_threshold_mode must be one of {sorted(THRESHOLD_MODES)}, got {mode!r}")
    if not isinstance(batches, int) or isinstance(batches, bool) or batches < 1:
        raise ValueError(f"act_threshold_batches must be an integer >= 1, got {batches!r}")


def check_threshold_ramp(ramp: int, steps: int, name: str = "act_threshold_ramp") -> None:
    """Validate a linear threshold ramp of ``ramp`` steps in a run of ``steps`` (GLUE runs and the
    compare grid share it); ``name`` is the field named in the error."""
    if not isinstance(ramp, int) or isinstance(ramp, bool) or ramp < 0:
        raise ValueError(f"{name} must be an integer >= 0 (steps), got {ramp!r}")
    if ramp == 1:
        raise ValueError(f"{name}=1 is the same as 0 (step 0 already uses the full thresholds): use 0, or a ramp "
                         "of 2 steps or more")
    if ramp > steps:
        raise ValueError(f"{name} ({ramp}) must be <= steps ({steps}): the thresholds must reach their calibrated "
                         "values before the run ends")


# ---- threshold choice (registry of modes) -----------------------------------------------------
# Each mode maps (layer -> density above each edge, layer -> element count,
# layer -> energy fraction at or below each edge, target) to layer -> chosen edge index.
# ``above[k]`` is the fraction with |a| > edges[k] (non-increasing in k); ``energy[k]`` the
# fraction of sum a**2 carried by |a| <= edges[k] (non-decreasing in k).


def _nearest_edge(above: Tensor, target: float) -> int:
    # The nearer of the two edges around the target (ties: the denser one).
    return int(torch.argmin((above - target).abs()))  # argmin returns the first (smallest k) minimum


def _per_layer(
    above: dict[str, Tensor], elements: dict[str, int], energy: dict[str, Tensor], target: float
) -> dict[str, int]:
    return {name: _nearest_edge(a, target) for name, a in above.items()}


def _pooled(above: dict[str, Tensor], elements: dict[str, int], chosen: Mapping[str, int]) -> float:
    total = sum(elements.values())
    return sum(float(above[name][k]) * elements[name] for name, k in chosen.items()) / total


def _global(
    above: dict[str, Tensor], elements: dict[str, int], energy: dict[str, Tensor], target: float
) -> dict[str, int]:
    total = sum(elements.values())
    pooled = sum(above[name] * (elements[name] / total) for name in above)
    k = _nearest_edge(pooled, target)  # type: ignore[arg-type]
    return {name: k for name in above}


def _equal_energy(
    above: dict[str, Tensor], elements: dict[str, int], energy: dict[str, Tensor], target: float
) -> dict[str, int]:
    # For a removed-energy fraction f every layer takes its last edge with energy[k] <= f; the
    # pooled density falls as f grows, so bisect f until it brackets the target, then keep the
    # nearer of the two bracketing choices (ties: the denser one, as for the other modes).
    def choose(f: float) -> dict[str, int]:
        return {name: max(int(torch.searchsorted(e, f, right=True)) - 1, 0) for name, e in energy.items()}

    lo, hi = 0.0, 1.0  # pooled density at lo >= target >= at hi (or the target is out of reach)
    for _ in range(60):
        mid = (lo + hi) / 2
        if _pooled(above, elements, choose(mid)) >= target:
            lo = mid
        else:
            hi = mid
    dense, sparse = choose(lo), choose(hi)
    gap_dense = _pooled(above, elements, dense) - target
    gap_sparse = target - _pooled(above, elements, sparse)
    return dense if gap_dense <= gap_sparse else sparse


THRESHOLD_MODES: dict[
    str, Callable[[dict[str, Tensor], dict[str, int], dict[str, Tensor], float], dict[str, int]]
] = {
    "layer": _per_layer,
    "global": _global,
    "energy": _equal_energy,
}


# ---- histogram --------------------------------------------------------------------------------


@dataclass
class MagnitudeHistogram:
    """Per-layer histograms of ``|a|`` over log-spaced float32 edges (see the module docstring).

    ``counts[layer][k]`` counts values in ``(edges[k-1], edges[k]]`` (``counts[0]``: exact zeros;
    the last entry: values above ``edges[-1]``).
    """

    edges: Tensor  # (E,) float32, edges[0] = 0, strictly increasing
    counts: dict[str, Tensor] = field(default_factory=dict)  # layer -> (E + 1,) int64
    site: str = "act"

    @classmethod
    def empty(cls, config: CalibrationConfig) -> MagnitudeHistogram:
        b = config.bins_per_octave
        k = torch.arange(config.min_log2 * b, config.max_log2 * b + 1, dtype=torch.float64)
        edges = torch.cat([torch.zeros(1, dtype=torch.float64), torch.exp2(k / b)]).float()  # (E,)
        return cls(edges=edges, site=config.site)

    def add(self, name: str, a: Tensor) -> None:
        """Count the magnitudes of ``a`` (any shape; rows already restricted to real tokens)."""
        mag = a.detach().reshape(-1).float().abs()
        if mag.numel() == 0:
            return
        index = torch.bucketize(mag, self.edges.to(mag.device))  # (N,) in [0, E]
        hist = torch.bincount(index, minlength=self.edges.numel() + 1).cpu()
        if name in self.counts:
            self.counts[name] += hist
        else:
            self.counts[name] = hist

    def merge(self, other: MagnitudeHistogram) -> None:
        """Add ``other``'s counts (same edges), e.g. from another process or data shard."""
        if not torch.equal(self.edges, other.edges):
            raise ValueError("cannot merge histograms with different bin edges")
        for name, hist in other.counts.items():
            self.counts[name] = self.counts[name] + hist if name in self.counts else hist.clone()

    def density_above(self, name: str) -> Tensor:
        """(E,) float64: fraction of ``|a| > edges[k]`` for every edge ``k``."""
        hist = self.counts[name].double()
        return 1.0 - torch.cumsum(hist, 0)[:-1] / hist.sum()

    def energy_below(self, name: str) -> Tensor:
        """(E,) float64: fraction of ``sum a**2`` carried by ``|a| <= edges[k]`` for every edge ``k``.

        Each value counts at its bin's upper edge (the overflow bin at the last edge).
        """
        hist = self.counts[name].double()
        upper = torch.cat([self.edges.double(), self.edges[-1:].double()])  # (E + 1,)
        mass = hist * upper**2
        total = mass.sum()
        if total == 0:  # all exact zeros: nothing to remove
            return torch.ones(self.edges.numel(), dtype=torch.float64)
        return torch.cumsum(mass, 0)[:-1] / total

    def thresholds(self, target: float, mode: str = "layer") -> Thresholds:
        """Thresholds reaching ``target`` density (see :class:`CalibrationConfig`); no new data pass."""
        target = _check_target(target)
        if mode not in THRESHOLD_MODES:
            raise ValueError(f"mode must be one of {sorted(THRESHOLD_MODES)}, got {mode!r}")
        if not self.counts:
            raise RuntimeError("the histogram is empty: run forward passes with real tokens first")
        above = {name: self.density_above(name) for name in self.counts}
        elements = {name: int(hist.sum()) for name, hist in self.counts.items()}
        energy = {name: self.energy_below(name) for name in self.counts}
        chosen = THRESHOLD_MODES[mode](above, elements, energy, target)
        return Thresholds(
            values={name: float(self.edges[k]) for name, k in chosen.items()},
            target=target,
            mode=mode,
            achieved={name: float(above[name][k]) for name, k in chosen.items()},
            natural={name: float(above[name][0]) for name in above},
            elements=elements,
            site=self.site,
        )


class _HistogramRecorder(ActivationRecorder):
    """An :class:`ActivationRecorder` that feeds real-token activations to a histogram.

    Reuses the recorder's hooks and real-token masking; only what is done with a masked activation
    differs (a histogram instead of counts).
    """

    # A thresholded site is observed *before* its threshold (a wrapper's inner module; an input
    # site ahead of its threshold hook): this is what the threshold is chosen on, while the
    # thresholds of earlier layers stay in effect.
    inputs_first = True

    def __init__(self, model: nn.Module, histogram: MagnitudeHistogram, *, count_padding: bool,
                 skip_leading: int = 0) -> None:
        sites = []
        for s in find_activation_sites(model, histogram.site):  # type: ignore[arg-type]
            if isinstance(model.get_submodule(s.module_path), ThresholdedActivation):
                s = replace(s, module_path=s.module_path + ".inner")
            sites.append(s)
        super().__init__(model, sites, thresholds=(), count_padding=count_padding, track_stats=False,
                         skip_leading=skip_leading)
        self.histogram = histogram

    def _record(self, site: ActivationSite, a: Tensor) -> None:
        if not self.enabled:
            return
        mask = self._real_mask(site, a)  # (B, T) bool or None
        a = a.detach()
        self.histogram.add(site.name, a if mask is None else a[mask])  # (N, F)


@torch.no_grad()
def collect_histograms(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    config: CalibrationConfig | None = None,
    *,
    progress: bool = False,
    skip_leading: int = 0,
) -> MagnitudeHistogram:
    """One pass over ``batches`` (dicts of model inputs): per-layer histograms of ``|a|``.

    The model runs in eval mode (restored afterwards). Only real tokens count (the attention mask
    of each forward call; see :class:`deftune.density.ActivationRecorder`), less the first
    ``skip_leading`` positions of each sequence (prompt tuning's virtual tokens,
    :func:`deftune.methods.virtual_token_count`). On a model with thresholds applied, each layer is
    observed before its own threshold, after earlier layers'.
    """
    config = config or CalibrationConfig()
    histogram = MagnitudeHistogram.empty(config)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with _HistogramRecorder(model, histogram, count_padding=config.count_padding, skip_leading=skip_leading):
            iterator = batches
            if progress:
                from deftune.progress import track

                iterator = track(batches, description="calibrating")
            for batch in iterator:
                model(**to_device(batch, device))
    finally:
        model.train(was_training)
    return histogram


def _check_histogram_fits(histogram: MagnitudeHistogram, config: CalibrationConfig) -> None:
    """A histogram passed in must come from the same site and bins as ``config`` would collect."""
    if histogram.site != config.site:
        raise ValueError(f"the histogram was collected at site {histogram.site!r}, the config asks for site "
                         f"{config.site!r}: collect it with the same CalibrationConfig")
    expected = MagnitudeHistogram.empty(config).edges
    if histogram.edges.shape != expected.shape or not torch.equal(histogram.edges.cpu(), expected):
        raise ValueError("the histogram's bin edges differ from the config's (bins_per_octave / range): collect "
                         "it with the same CalibrationConfig")


def calibrate_thresholds(
    model: nn.Module,
    batches: Sequence[Mapping[str, Tensor]],
    config: CalibrationConfig | None = None,
    *,
    histogram: MagnitudeHistogram | None = None,
    progress: bool = False,
    skip_leading: int = 0,
) -> Thresholds:
    """Per-layer thresholds that reach ``config.target`` density on ``batches``.

    ``1 + config.refine_passes`` passes over ``batches`` (a list: it is iterated again); pass a
    ``histogram`` of the unthresholded model (:func:`collect_histograms`) to skip the first pass,
    e.g. when calibrating several targets. ``skip_leading``: as :func:`collect_histograms`.
    """
    config = config or CalibrationConfig()
    if histogram is None:
        histogram = collect_histograms(model, batches, config, progress=progress, skip_leading=skip_leading)
    else:
        _check_histogram_fits(histogram, config)
    th = histogram.thresholds(config.target, config.mode)
    passes = 0
    while passes < config.refine_passes and any(th.values.values()):  # all 0: a pass would change nothing
        with thresholded(model, th):
            histogram = collect_histograms(model, batches, config, progress=progress, skip_leading=skip_leading)
        th = histogram.thresholds(config.target, config.mode)
        passes += 1
    th.refine_passes = passes
    return th


# ---- metric vs target density ------------------------------------------------------------------


@dataclass
class SweepPoint:
    """The task metric of a model thresholded for one target density.

    Attributes:
        target: the density asked for.
        metrics: what ``evaluate`` returned (e.g. ``{"accuracy": 91.2}`` or ``{"perplexity": 12.3}``).
        calibration_density: overall density ``|a| > t`` on the calibration data.
        eval_density: overall exact non-zero density measured during evaluation (held-out data).
        eval_per_layer: layer -> exact density during evaluation.
        thresholds: layer -> t.
    """

    target: float
    metrics: dict[str, float]
    calibration_density: float
    eval_density: float
    eval_per_layer: dict[str, float]
    thresholds: dict[str, float]


def sweep_targets(
    model: nn.Module,
    batches: Sequence[Mapping[str, Tensor]],
    targets: Iterable[float],
    evaluate: Callable[[nn.Module], Mapping[str, float]],
    config: CalibrationConfig | None = None,
    *,
    histogram: MagnitudeHistogram | None = None,
    skip_leading: int = 0,
) -> list[SweepPoint]:
    """For each target: calibrate on ``batches``, threshold ``model``, call ``evaluate(model)`` and
    measure the exact density meanwhile.

    ``evaluate`` runs forward passes (with attention masks) and returns metrics; the model is
    restored after each point. ``config`` gives everything but the target; the unthresholded
    histogram (pass 1) is collected once and shared by all targets. ``skip_leading``: positions
    left out of calibration and density (prompt-tuning virtual tokens), as
    :func:`collect_histograms`.
    """
    config = config or CalibrationConfig()
    if histogram is None:
        histogram = collect_histograms(model, batches, config, skip_leading=skip_leading)
    points = []
    for target in targets:
        th = calibrate_thresholds(model, batches, replace(config, target=target), histogram=histogram,
                                  skip_leading=skip_leading)
        recorder = ActivationRecorder(model, site=config.site, thresholds=(), count_padding=config.count_padding,  # type: ignore[arg-type]
                                      skip_leading=skip_leading)
        with thresholded(model, th), recorder as rec:
            metrics = dict(evaluate(model))
            density = rec.result()
        points.append(
            SweepPoint(
                target=th.target,
                metrics={k: float(v) for k, v in metrics.items()},
                calibration_density=th.overall_achieved,
                eval_density=density.overall,
                eval_per_layer=density.exact_per_layer,
                thresholds=dict(th.values),
            )
        )
    return points
