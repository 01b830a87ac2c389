"""deftune: density-efficient fine-tuning of transformers (DEFT, Runwal et al., AAAI 2025).

Public API::

    from deftune import (find_activation_sites, measure_density, ActivationRecorder,
                         DensityLossConfig, DensityRegularizer)
"""

from deftune.arch import (
    ActivationSite,
    ArchSpec,
    SitePattern,
    UnsupportedArchitectureError,
    find_activation_sites,
    register_architecture,
    supported_model_types,
)
from deftune.density import ActivationRecorder, DensityResult, LayerDensity, measure_density
from deftune.losses import DENSITY_LOSSES, DensityLossConfig, register_density_loss
from deftune.regularizer import DensityRegularizer, LossParts

__version__ = "0.1.0"

__all__ = [
    "ActivationRecorder",
    "ActivationSite",
    "ArchSpec",
    "DENSITY_LOSSES",
    "DensityLossConfig",
    "DensityRegularizer",
    "DensityResult",
    "LayerDensity",
    "LossParts",
    "SitePattern",
    "UnsupportedArchitectureError",
    "find_activation_sites",
    "measure_density",
    "register_architecture",
    "register_density_loss",
    "supported_model_types",
]
