"""Where each method goes in each architecture family, and which task head trains.

The MLP sites come from :mod:`deftune.arch` (``find_activation_sites(model)[i].mlp_path`` plus
``arch_spec(model).down_proj``: the down projection, whose *input* is the activation DEFT
regularises and whose *output* is the MLP's output). The attention projections are the small
per-family table :data:`FAMILY_TARGETS` below (keys: ``ArchSpec.family``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from deftune.arch import arch_spec, base_config, find_activation_sites


@dataclass(frozen=True)
class FamilyTargets:
    """Attention-side module names of one architecture family.

    Attributes:
        query_value: LoRA / DoRA targets (DEFT: the query and value projections).
        key_value: IA3's attention targets (Liu et al. 2022 rescale keys and values).
        attention_output: regex (searched at the end of module paths) of the attention output
            projection, where a Houlsby adapter goes after the attention sublayer.
        fan_in_fan_out: the projections are ``transformers`` ``Conv1D`` (weight ``(in, out)``).
    """

    query_value: tuple[str, ...]
    key_value: tuple[str, ...]
    attention_output: str
    fan_in_fan_out: bool = False


FAMILY_TARGETS: dict[str, FamilyTargets] = {
    "bert": FamilyTargets(("query", "value"), ("key", "value"), r"attention\.output\.dense$"),
    "distilbert": FamilyTargets(("q_lin", "v_lin"), ("k_lin", "v_lin"), r"attention\.out_lin$"),
    "t5": FamilyTargets(("q", "v"), ("k", "v"), r"(SelfAttention|EncDecAttention)\.o$"),
    # GPT-2 fuses q, k, v into one Conv1D: LoRA and IA3 adapt all three (as peft does).
    "gpt2": FamilyTargets(("c_attn",), ("c_attn",), r"attn\.c_proj$", fan_in_fan_out=True),
    "opt": FamilyTargets(("q_proj", "v_proj"), ("k_proj", "v_proj"), r"self_attn\.out_proj$"),
    "llama": FamilyTargets(("q_proj", "v_proj"), ("k_proj", "v_proj"), r"self_attn\.o_proj$"),
    # Phi-3 fuses q, k, v into one Linear: LoRA and IA3 adapt all three, as for GPT-2.
    "phi3": FamilyTargets(("qkv_proj",), ("qkv_proj",), r"self_attn\.o_proj$"),
}


def family_targets(model: nn.Module) -> FamilyTargets:
    """The :class:`FamilyTargets` of ``model``'s architecture family."""
    family = arch_spec(model).family
    if family not in FAMILY_TARGETS:
        raise ValueError(
            f"no default target modules for architecture family {family!r} (known: "
            f"{sorted(FAMILY_TARGETS)}); pass MethodConfig(target_modules=(...)) explicitly or add "
            "an entry to deftune.methods.targets.FAMILY_TARGETS"
        )
    return FAMILY_TARGETS[family]


def mlp_output_paths(model: nn.Module) -> list[str]:
    """Module paths of every MLP's down projection (input: the activation; output: the MLP's)."""
    down = arch_spec(model).down_proj
    return [f"{site.mlp_path}.{down}" for site in find_activation_sites(model)]


def attention_output_paths(model: nn.Module) -> list[str]:
    """Module paths of every attention output projection (Houlsby's first adapter position)."""
    regex = re.compile(family_targets(model).attention_output)
    return [path for path, _ in model.named_modules() if regex.search(path)]


def matches(path: str, names: tuple[str, ...] | list[str]) -> bool:
    """peft's list semantics: ``path`` equals a name or ends with ``"." + name``."""
    return any(path == name or path.endswith("." + name) for name in names)


def resolve_modules(model: nn.Module, names: tuple[str, ...] | list[str], what: str) -> list[str]:
    """Full paths of the modules of ``model`` matching ``names``; raises if one name matches none."""
    paths = [path for path, _ in model.named_modules() if path and matches(path, names)]
    unmatched = [name for name in names if not any(matches(p, [name]) for p in paths)]
    if unmatched:
        raise ValueError(f"{what}: no module of {type(model).__name__} matches {unmatched}")
    return paths


# ---- task type and task head ------------------------------------------------------------------

_CLASS_SUFFIX_TASK: tuple[tuple[str, str], ...] = (
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForCausalLM", "CAUSAL_LM"),
    ("LMHeadModel", "CAUSAL_LM"),
    ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
)
# Task heads (top-level children) that train with every method; peft uses the same names.
HEAD_MODULES: dict[str, tuple[str, ...]] = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}


def infer_task_type(model: nn.Module) -> str:
    """peft task type from the model class (``FEATURE_EXTRACTION`` for a bare backbone)."""
    cls = type(model).__name__
    if cls.endswith("ForConditionalGeneration"):
        encoder_decoder = bool(getattr(base_config(model), "is_encoder_decoder", False))
        return "SEQ_2_SEQ_LM" if encoder_decoder else "CAUSAL_LM"
    for suffix, task in _CLASS_SUFFIX_TASK:
        if cls.endswith(suffix):
            return task
    return "FEATURE_EXTRACTION"


def head_module_names(model: nn.Module, task_type: str, extra: tuple[str, ...] | None) -> tuple[str, ...]:
    """Names (top-level children, plus ``extra`` matched anywhere) trained in full with the method."""
    heads = tuple(name for name, _ in model.named_children() if name in HEAD_MODULES.get(task_type, ()))
    return heads + tuple(n for n in (extra or ()) if n not in heads)


def freeze_all(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def head_parameter_names(model: nn.Module, heads: tuple[str, ...]) -> list[str]:
    """Parameter names under the modules named ``heads`` (peft matching rules)."""
    if not heads:
        return []
    prefixes = [p + "." for p in resolve_modules(model, heads, "modules_to_save")]
    return [n for n, _ in model.named_parameters() if any(n.startswith(pre) for pre in prefixes)]
