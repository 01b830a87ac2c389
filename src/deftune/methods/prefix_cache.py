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
``tests/methods/test_prefix_cache.py`` checks equal outputs against peft's own path (where the
installed transformers still allows it) and a saved peft-format run loading into it. As in peft,
the real tokens' absolute positions start at ``num_virtual_tokens`` (transformers offsets
``position_ids`` by the cache length). Causal-LM and seq2seq prefix tuning stay on peft's path.
"""

from __future__ import annotations

import inspect

import torch
from peft import PeftModel
from torch import nn

# peft task types whose models call ``_prefix_tuning_forward`` (the signature check above)
PREFIX_BY_HOOK: tuple[str, ...] = ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS")
_HANDLE = "_deftune_prefix_hook"


def _backbone(peft_model: PeftModel) -> nn.Module:
    task_model = peft_model.get_base_model()
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


def feed_prefix(peft_model: PeftModel) -> PeftModel:
    """Install the prefix pre-hook on ``peft_model``'s backbone (once); returns ``peft_model``."""
    if getattr(peft_model, _HANDLE, None) is not None:
        return peft_model
    backbone = _backbone(peft_model)
    name = cache_argument(backbone)
    n_virtual = int(peft_model.active_peft_config.num_virtual_tokens)

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
            raise ValueError("prefix tuning supplies the key/value cache itself; do not pass one")
        inputs = args[0] if args else kwargs.get("input_ids")
        if inputs is None:
            inputs = kwargs["inputs_embeds"]
        batch = inputs.shape[0]
        args, kwargs = list(args), dict(kwargs)
        mask_in_args = len(args) > 1
        mask = args[1] if mask_in_args else kwargs.get("attention_mask")
        if mask is not None:
            if mask.dim() != 2:
                raise ValueError(
                    f"prefix tuning extends a 2-D attention_mask (batch, tokens); got shape {tuple(mask.shape)}"
                )
            mask = torch.cat([mask.new_ones(batch, n_virtual), mask], dim=1)  # (B, P + T)
            if mask_in_args:
                args[1] = mask
            else:
                kwargs["attention_mask"] = mask
        kwargs[name] = peft_model.get_prompt(batch_size=batch)
        return tuple(args), kwargs

    setattr(peft_model, _HANDLE, backbone.register_forward_pre_hook(hook, with_kwargs=True))
    return peft_model
