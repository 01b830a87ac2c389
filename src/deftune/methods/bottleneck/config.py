"""Configuration of bottleneck adapters (data only, validated, saved inside the method config).

Bottleneck adapters (Houlsby et al., ICML 2019, arXiv 1902.00751) are small two-layer MLPs
``x -> up(act(down(x)))`` with a residual connection, inserted after a transformer sublayer:

* ``houlsby``: after the attention sublayer *and* after the MLP;
* ``pfeiffer`` (Pfeiffer et al., 2020, arXiv 2005.00247): after the MLP only (the DEFT paper's
  adapter configuration, with reduction factor 16).

``placement="parallel"`` (He et al., ICLR 2022, arXiv 2110.04366) feeds the adapter with the
wrapped projection's input and adds its output to the projection's output.
"""

from __future__ import annotations

from dataclasses import dataclass

from deftune.methods.config import (
    ADAPTER_ACTIVATIONS,
    ADAPTER_KINDS,
    ADAPTER_PLACEMENTS,
    MethodConfig,
)


@dataclass(frozen=True)
class BottleneckConfig:
    """Bottleneck adapter hyper-parameters.

    Attributes:
        kind: ``pfeiffer`` or ``houlsby`` (where the adapters go when ``target_modules`` is None).
        reduction_factor: bottleneck size = output features of the wrapped projection // factor.
        activation: ``relu``, ``gelu`` or ``identity`` (linear: the adapter can be merged).
        placement: ``sequential`` or ``parallel``.
        scaling: factor on the adapter's output.
        target_modules: projections to wrap (module names, peft matching); None: per ``kind``.
    """

    kind: str = "pfeiffer"
    reduction_factor: int = 16
    activation: str = "relu"
    placement: str = "sequential"
    scaling: float = 1.0
    target_modules: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for name, accepted in (
            ("kind", ADAPTER_KINDS),
            ("activation", ADAPTER_ACTIVATIONS),
            ("placement", ADAPTER_PLACEMENTS),
        ):
            if getattr(self, name) not in accepted:
                raise ValueError(f"{name} must be one of {accepted}, got {getattr(self, name)!r}")
        if not isinstance(self.reduction_factor, int) or self.reduction_factor < 1:
            raise ValueError(f"reduction_factor must be an integer >= 1, got {self.reduction_factor!r}")

    @classmethod
    def from_method_config(cls, cfg: MethodConfig) -> BottleneckConfig:
        return cls(
            kind=cfg.adapter_kind,
            reduction_factor=cfg.reduction_factor,
            activation=cfg.adapter_activation,
            placement=cfg.adapter_placement,
            scaling=cfg.adapter_scaling,
            target_modules=cfg.target_modules,
        )
