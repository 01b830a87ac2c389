"""Activation-sparse MLP inference: operator, Triton kernels and drop-in modules.

Public API::

    from deftune.sparse import sparsify_mlps_, restore_mlps_, SparseMLPConfig
    sparsify_mlps_(model, thresholds)        # {layer name: t_l} or one float; |a| <= t_l -> 0
    ...                                      # decode as usual: MLPs read only active weight rows
    restore_mlps_(model)                     # the original modules are back

Functional operator: :func:`sparse_gated_mlp`, :func:`sparse_mlp`, :func:`sparse_down_proj`
(Triton on CUDA, the PyTorch reference of :mod:`deftune.sparse.reference` elsewhere). Design and
measurements: ``docs/sparse.md`` and ``docs/benchmarks.md``.
"""

from deftune.sparse.calibrate import CalibrationConfig, calibrate_thresholds  # noqa: E402
from deftune.sparse.modules import (
    SparseGatedMLP,
    SparseInputLinear,
    SparseThresholdedActivation,
    SparseWrapper,
    activation_name,
    restore_mlps_,
    sparse_modules,
    sparsify_mlps_,
)
from deftune.sparse.ops import SparseMLPConfig, sparse_down_proj, sparse_gated_mlp, sparse_mlp, use_triton
from deftune.sparse.reference import (
    ACTIVATIONS,
    GatedMLPWeights,
    MLPWeights,
    down_proj_reference,
    gated_mlp_reference,
    mlp_reference,
    threshold_activation,
)
from deftune.sparse.thresholds import (
    InputThreshold,
    ThresholdedActivation,
    Thresholds,
    apply_thresholds,
    ramped_thresholds,
    remove_thresholds,
    threshold_holders,
    thresholded,
)
from deftune.sparse.triton_mlp import HAS_TRITON, KernelConfig

__all__ = [
    "CalibrationConfig",
    "InputThreshold",
    "ThresholdedActivation",
    "Thresholds",
    "apply_thresholds",
    "calibrate_thresholds",
    "ramped_thresholds",
    "remove_thresholds",
    "threshold_holders",
    "thresholded",
    "ACTIVATIONS",
    "GatedMLPWeights",
    "HAS_TRITON",
    "KernelConfig",
    "MLPWeights",
    "SparseGatedMLP",
    "SparseInputLinear",
    "SparseMLPConfig",
    "SparseWrapper",
    "SparseThresholdedActivation",
    "activation_name",
    "down_proj_reference",
    "gated_mlp_reference",
    "mlp_reference",
    "restore_mlps_",
    "sparse_down_proj",
    "sparse_gated_mlp",
    "sparse_mlp",
    "sparse_modules",
    "sparsify_mlps_",
    "threshold_activation",
    "use_triton",
]
