"""ADA-DEFT: learned per-layer gates on MLP blocks during DEFT training, and MLP-block skipping.

A documented *reconstruction* (the paper's exact ADA-DEFT formulation is not public); see
``docs/ada.md``. Public API::

    from deftune.ada import AdaConfig, AdaExtension               # training (a TrainExtension)
    from deftune.ada import SkipConfig, plan_skip, skip_mlps_      # inference
    from deftune.ada import save_skipped, load_skipped, load_gates
    from deftune.ada import SkipRunConfig, skip_run                # `deftune skip`
    from deftune.ada import compare_latency, peak_memory           # measurement
"""

from deftune.ada.config import AdaConfig, SkipConfig
from deftune.ada.extension import AdaExtension, load_gates
from deftune.ada.gates import GATES, Gates, HardConcreteGates, SigmoidGates, make_gates, register_gate
from deftune.ada.measure import LatencyStats, compare_latency, peak_memory, peak_rss_bytes
from deftune.ada.pipeline import SkipRunConfig, SkipRunResult, skip_run
from deftune.ada.skip import (
    SKIP_POLICIES,
    SkipPlan,
    SkipReport,
    density_scores,
    load_skipped,
    param_bytes,
    plan_skip,
    register_skip_policy,
    save_skipped,
    skip_mlps_,
)
from deftune.ada.wrappers import MLPGates, register_skipper

__all__ = [
    "AdaConfig",
    "AdaExtension",
    "GATES",
    "Gates",
    "HardConcreteGates",
    "LatencyStats",
    "MLPGates",
    "SKIP_POLICIES",
    "SigmoidGates",
    "SkipConfig",
    "SkipPlan",
    "SkipReport",
    "SkipRunConfig",
    "SkipRunResult",
    "compare_latency",
    "density_scores",
    "load_gates",
    "load_skipped",
    "make_gates",
    "param_bytes",
    "peak_memory",
    "peak_rss_bytes",
    "plan_skip",
    "register_gate",
    "register_skip_policy",
    "register_skipper",
    "save_skipped",
    "skip_mlps_",
    "skip_run",
]
