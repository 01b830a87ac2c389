"""Walk a model and wrap its sublayer output projections with :class:`BottleneckLayer`.

Insertion points per ``kind`` (when ``target_modules`` is None), found through
:mod:`deftune.methods.targets`:

* ``pfeiffer``: every MLP's down projection (``mlp_path`` + ``ArchSpec.down_proj``);
* ``houlsby``: the attention output projections as well (per-family table).
"""

from __future__ import annotations

from torch import nn

from deftune.methods.bottleneck.config import BottleneckConfig
from deftune.methods.bottleneck.layer import BottleneckLayer
from deftune.methods.targets import attention_output_paths, mlp_output_paths, resolve_modules


def resolve_targets(model: nn.Module, config: BottleneckConfig) -> list[str]:
    """Full paths of the projections to wrap, in module order."""
    if config.target_modules:
        wanted = set(resolve_modules(model, config.target_modules, "adapter target_modules"))
    else:
        wanted = set(mlp_output_paths(model))
        if config.kind == "houlsby":
            wanted |= set(attention_output_paths(model))
    return [path for path, _ in model.named_modules() if path in wanted]


def add_adapters(model: nn.Module, config: BottleneckConfig, paths: list[str]) -> None:
    """Replace each module at ``paths`` by a :class:`BottleneckLayer` wrapping it (in place).

    Every wrapper is built (and so every target checked) before the first one is installed: a
    target that cannot carry an adapter leaves the model unchanged.
    """
    layers = {}
    for path in paths:
        target = model.get_submodule(path)
        if isinstance(target, BottleneckLayer):
            raise ValueError(f"{path} already carries a bottleneck adapter")
        layers[path] = BottleneckLayer(target, config)
    for path, layer in layers.items():
        model.set_submodule(path, layer)


def adapter_layers(model: nn.Module) -> dict[str, BottleneckLayer]:
    """Every :class:`BottleneckLayer` of ``model`` by module path."""
    return {path: m for path, m in model.named_modules() if isinstance(m, BottleneckLayer)}


def adapter_parameter_names(model: nn.Module) -> list[str]:
    """Names of the adapters' own parameters (not the wrapped projections')."""
    names = []
    for path, layer in adapter_layers(model).items():
        for part in BottleneckLayer.adapter_layer_names:
            names += [f"{path}.{part}.{n}" for n, _ in getattr(layer, part).named_parameters()]
    return names


def merge_adapters(model: nn.Module) -> None:
    layers = list(adapter_layers(model).values())
    for layer in layers:
        layer._check_mergeable()  # all or nothing
    for layer in layers:
        layer.merge()


def unmerge_adapters(model: nn.Module) -> None:
    for layer in adapter_layers(model).values():
        layer.unmerge()
