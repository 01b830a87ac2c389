"""peft 0.21's prompt-learning ``generate()`` on transformers >= 5.24.

transformers 5.24 renamed the key/value cache argument ``past_key_values`` to ``cache`` (the old
name is still accepted, deprecated, until 5.40), and its ``prepare_inputs_for_generation`` now
returns the cache under ``cache``. peft 0.21's ``PeftModelForCausalLM`` and
``PeftModelForSeq2SeqLM`` post-process that dict and look for ``past_key_values``: finding none,
they take every decoding step for the first one. Measured on tiny LLaMA and T5 models with peft
0.21.2 (``tests/methods/test_prompt_generate.py``):

* prefix tuning (causal LM and seq2seq): the prefix is handed over under the old name beside the
  generation cache, which wins: the tokens are those of the model without the prefix;
* prompt tuning and P-tuning (causal LM): the virtual tokens are prepended again at every step,
  so the tokens drift from greedy decoding through ``model(...)`` calls.

The forward pass, and so training and teacher-forced evaluation, is unaffected. The mend is one
renaming: peft keeps the base model's ``prepare_inputs_for_generation`` as the attribute
``base_model_prepare_inputs_for_generation`` and calls it first; :class:`CacheUnderOldName` wraps
that call and hands the cache back under ``past_key_values``, the name peft reads and the model
still accepts. On transformers < 5.24 the dict already uses that name and the wrapper changes
nothing. It is installed for peft < 0.22 only, the versions known to read the old name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

_WRAPPED = "base_model_prepare_inputs_for_generation"


def peft_reads_old_cache_name() -> bool:
    """Whether the installed peft looks for the generation cache under ``past_key_values`` only."""
    import peft
    from packaging.version import Version

    return Version(peft.__version__) < Version("0.22")


class CacheUnderOldName:
    """Calls the base model's ``prepare_inputs_for_generation``; returns its cache as ``past_key_values``.

    An object holding the bound method, not a closure, so that ``copy.deepcopy`` of the model
    gives a copy whose wrapper calls the *copied* base model (deepcopy copies bound methods
    through its memo; functions it shares).
    """

    def __init__(self, prepare: Callable[..., dict[str, Any]]) -> None:
        self.prepare = prepare

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        inputs = self.prepare(*args, **kwargs)
        if "cache" in inputs and "past_key_values" not in inputs:
            inputs["past_key_values"] = inputs.pop("cache")
        return inputs


def mend_generate(model: nn.Module) -> nn.Module:
    """Make a peft prompt-learning model's ``generate()`` see its cache; returns ``model``.

    A no-op for other models (adapters, classifiers, peft >= 0.22) and when already mended.
    """
    prepare = getattr(model, _WRAPPED, None)
    config = getattr(model, "active_peft_config", None)
    if prepare is None or config is None or not config.is_prompt_learning:
        return model
    if isinstance(prepare, CacheUnderOldName) or not peft_reads_old_cache_name():
        return model
    setattr(model, _WRAPPED, CacheUnderOldName(prepare))
    return model
