"""Prefix tuning's keys and values fed to the backbone by a forward pre-hook.

For task heads (sequence / token classification, extractive QA) peft 0.21 runs prefix tuning by
calling the task model, or failing that its backbone, with ``past_key_values=`` — and first
checks that the name ``past_key_values`` is in that ``forward``'s signature. transformers 5.24
renamed the argument ``cache`` (``past_key_values`` is still accepted, deprecated, until 5.40), so
the check refuses every model. deftune keeps peft's prefix parameters, initialisation and saved
format (a plain :class:`peft.PeftModel` with ``task_type=None``; the head trains and saves as
``modules_to_save``) and passes the prefix itself: a pre-hook on the backbone
(``PreTrainedModel.base_model``, e.g. ``model.bert``) adds

* the prefix cache from ``PeftModel.get_prompt(batch)`` under the name the backbone's ``forward``
  takes (``cache`` or ``past_key_values``);
* ``num_virtual_tokens`` leading ones to a 2-D ``attention_mask``, so every token sees the prefix.

This is the call peft makes, moved one module down, so it computes the same function:
``tests/methods/test_prefix_cache.py`` checks equal outputs and gradients against peft's own path
where the installed transformers still runs it, against outputs recorded from that path on every
version, and a saved peft-format run loading into it. As in peft,
the real tokens' absolute positions start at ``num_virtual_tokens`` (transformers offsets
``position_ids`` by the cache length, and the hook offsets ``position_ids`` a caller passes, as
peft does). Causal-LM and seq2seq prefix tuning stay on peft's path (its ``generate()`` needs
:mod:`deftune.methods.prompt_generate` on transformers >= 5.24). Encoder–decoder models with a
classification head are refused.
"""

from __future__ import annotations

import inspect

import torch
from peft import PeftModel
from torch import nn

from deftune.methods.call_args import CallArguments

# peft task types whose models call ``_prefix_tuning_forward`` (the signature check above)
PREFIX_BY_HOOK: tuple[str, ...] = ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS")
_HANDLE = "_deftune_prefix_hook"


def _backbone(peft_model: PeftModel) -> nn.Module:
    task_model = peft_model.get_base_model()
    if getattr(task_model.config, "is_encoder_decoder", False):
        raise ValueError(
            f"prefix tuning with a task head is not supported for encoder-decoder models "
            f"({type(task_model).__name__}); use a seq2seq task type (SEQ_2_SEQ_LM) or another method"
        )
    backbone = getattr(task_model, "base_model", task_model)
    if backbone is task_model:
        raise TypeError(
            f"prefix tuning with a task head needs a task model with a backbone (e.g. model.bert); "
            f"{type(task_model).__name__} has none"
        )
    return backbone


def cache_argument(module: nn.Module) -> str:
    """The keyword ``module.forward`` takes the key/value cache by: ``cache`` or ``past_key_values``."""
    params = inspect.signature(module.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise TypeError(
        f"{type(module).__name__}.forward takes neither `cache` nor `past_key_values`: prefix tuning "
        "needs a model whose attention accepts a key/value cache"
    )


class PrefixFeeder:
    """The backbone pre-hook: adds the active adapter's prefix cache and widens the mask.

    A hook object rather than a closure, so that ``copy.deepcopy`` of the model gives a copy that
    feeds its *own* prefix (deepcopy copies objects through its memo; functions it shares).
    """

    def __init__(self, peft_model: PeftModel, backbone: nn.Module) -> None:
        self.peft_model = peft_model
        self.arguments = CallArguments(backbone.forward)
        self.cache_name = cache_argument(backbone)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        # every argument by name: a positional one (e.g. BERT's attention_mask) is then found
        named = self.arguments.bind(args, kwargs)
        if named.get("cache") is not None or named.get("past_key_values") is not None:
            raise ValueError("prefix tuning supplies the key/value cache itself; do not pass one")
        inputs = named.get("input_ids")
        batch = (inputs if inputs is not None else named["inputs_embeds"]).shape[0]
        n_virtual = int(self.peft_model.active_peft_config.num_virtual_tokens)
        mask = named.get("attention_mask")
        if mask is not None:
            if mask.dim() != 2:
                raise ValueError(
                    f"prefix tuning extends a 2-D attention_mask (batch, tokens); got shape {tuple(mask.shape)}"
                )
            named["attention_mask"] = torch.cat([mask.new_ones(batch, n_virtual), mask], dim=1)  # (B, P + T)
        if named.get("position_ids") is not None:  # the real tokens follow the prefix, as peft offsets them
            named["position_ids"] = named["position_ids"] + n_virtual
        named[self.cache_name] = self.peft_model.get_prompt(batch_size=batch)
        return (), named


def feed_prefix(peft_model: PeftModel) -> PeftModel:
    """Install the prefix pre-hook on ``peft_model``'s backbone (once); returns ``peft_model``."""
    if getattr(peft_model, _HANDLE, None) is not None:
        return peft_model
    backbone = _backbone(peft_model)
    feeder = PrefixFeeder(peft_model, backbone)
    setattr(peft_model, _HANDLE, backbone.register_forward_pre_hook(feeder, with_kwargs=True))
    return peft_model
