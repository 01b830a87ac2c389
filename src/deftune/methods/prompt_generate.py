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
  so the tokens drift from greedy decoding through ``model(...)`` calls. (Seq2seq prompt and
  P-tuning prepend to the encoder input once and are unaffected.)

The forward pass, and so training and teacher-forced evaluation, is unaffected. The mend is one
renaming, scoped to peft's own call: peft's ``prepare_inputs_for_generation`` first calls the base
model's, which it keeps as the attribute ``base_model_prepare_inputs_for_generation``.
:class:`PrepareWithOldCacheName` takes the place of peft's method on the model; for the length of
each call it puts a :class:`CacheUnderOldName` wrapper in that attribute, which hands the cache
back under ``past_key_values`` (the name peft reads and the model still accepts; transformers
warns that it is deprecated), and puts the base method back in a ``finally``. The base model
itself is never changed. On transformers < 5.24 the dict already uses the old name and nothing
is renamed.

Installed for peft < 0.22: 0.21 is the release checked. A later peft is trusted to read the new
name; the tests above compare ``generate()`` with greedy decoding on whichever peft is installed,
so a peft that still misreads the cache fails them.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from deftune.methods.peft_compat import ModelT, peft_needs_mends

_BASE_PREPARE = "base_model_prepare_inputs_for_generation"  # the attribute peft calls first


class CacheUnderOldName:
    """Calls a ``prepare_inputs_for_generation``; returns its lone ``cache`` as ``past_key_values``."""

    def __init__(self, prepare: Any) -> None:
        self.prepare = prepare
        self.__wrapped__ = prepare  # inspect.signature of the wrapper gives prepare's

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        inputs = self.prepare(*args, **kwargs)
        if "cache" in inputs and "past_key_values" not in inputs:
            inputs["past_key_values"] = inputs.pop("cache")
        return inputs


class PrepareWithOldCacheName:
    """peft's ``prepare_inputs_for_generation``, run with the base model's output renamed.

    Holds the model, not a bound method or a closure, so that ``copy.deepcopy`` and pickling give
    a copy whose generate() prepares with the copy's own base model and prompt.
    """

    def __init__(self, peft_model: nn.Module) -> None:
        self.peft_model = peft_model

    @property
    def __signature__(self) -> inspect.Signature:  # transformers reads it: peft's method's
        return inspect.signature(type(self.peft_model).prepare_inputs_for_generation.__get__(self.peft_model))

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        model = self.peft_model
        base_prepare = getattr(model, _BASE_PREPARE)
        setattr(model, _BASE_PREPARE, CacheUnderOldName(base_prepare))
        try:
            return type(model).prepare_inputs_for_generation(model, *args, **kwargs)
        finally:
            setattr(model, _BASE_PREPARE, base_prepare)


def mend_generate(model: ModelT) -> ModelT:
    """Make a peft prompt-learning model's ``generate()`` read transformers' cache; returns ``model``.

    A no-op for other models (adapters, classifiers), for peft >= 0.22, and when already mended.
    """
    config = getattr(model, "active_peft_config", None)
    if not hasattr(model, _BASE_PREPARE) or config is None or not config.is_prompt_learning:
        return model
    if isinstance(model.__dict__.get("prepare_inputs_for_generation"), PrepareWithOldCacheName):
        return model
    if peft_needs_mends():
        model.prepare_inputs_for_generation = PrepareWithOldCacheName(model)
    return model
