"""Per-token heads under prompt / P-tuning: targets and outputs kept on the real tokens.

Prompt tuning and P-tuning prepend ``num_virtual_tokens`` (n) embeddings, so a per-token head
sees n + T positions. peft 0.21 extends the attention mask but leaves the targets as they are:

* token classification (``TOKEN_CLS``): ``labels`` of shape (B, T) meet logits of (B, n + T):
  the loss fails with a batch-size mismatch;
* extractive QA (``QUESTION_ANS``): ``start_positions`` / ``end_positions`` index the real
  tokens but are read as positions of the longer sequence, so training silently points the
  head n tokens early, and the span logits (B, n + T) no longer line up with the input.

:class:`VirtualPositions` is a pre- and post-hook pair on the peft model: the labels get n leading
``-100`` (ignored by the loss), the QA positions are clamped at 0 and shifted by n (a position at or past the end stays
ignored, as transformers clamps it to the ignored index), and the outputs lose their first n
positions, so ``logits`` / ``start_logits`` / ``end_logits`` are (B, T, ...) again, aligned with
the input. (peft pads causal-LM labels the same way but leaves their logits at n + T.) The QA
loss is the base model's over the n + T positions: the virtual ones are never a target, so
training only pushes their logits down. Hidden states and attentions keep all n + T positions;
tuple outputs (``return_dict=False``) are refused. Prefix tuning adds no positions and needs none
of this.

Installed for peft < 0.22, the releases checked (0.21); ``tests/methods/test_virtual_positions.py``
compares the outputs with the task model run by hand on whichever peft is installed, and checks
that peft alone still misplaces the targets, so a peft release that changes this fails there.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers.utils import ModelOutput

from deftune.methods.call_args import CallArguments
from deftune.methods.peft_compat import ModelT, peft_needs_mends

PER_TOKEN_TASKS: tuple[str, ...] = ("TOKEN_CLS", "QUESTION_ANS")
_OUTPUTS = ("logits", "start_logits", "end_logits")
_HANDLES = "_deftune_virtual_position_hooks"


def added_positions(peft_model: nn.Module) -> int:
    """Input positions the active adapter prepends: n for prompt / P-tuning, 0 otherwise."""
    config = peft_model.active_peft_config
    if config.peft_type not in ("PROMPT_TUNING", "P_TUNING"):  # str enums: compare, never str()
        return 0
    return int(config.num_virtual_tokens)


_TUPLES = (
    "prompt / P-tuning with a per-token head aligns the outputs of a ModelOutput; call the model "
    "with return_dict=True (the default) and leave config.return_dict at True"
)


class VirtualPositions:
    """The hook pair: shifts targets past the virtual tokens, drops them from the outputs.

    Stateless apart from the signature: n is read from the called module's active adapter, so a
    deep copy or a switch of adapter needs nothing else.
    """

    def __init__(self, peft_model: nn.Module) -> None:
        self.arguments = CallArguments(peft_model.forward)

    def before(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple, dict]:
        n = added_positions(module)
        if n == 0:
            return args, kwargs
        named = self.arguments.bind(args, kwargs)
        if named.get("return_dict") is False:
            raise ValueError(_TUPLES)
        labels = named.get("labels")
        if labels is not None:  # (B, T) -> (B, n + T), the virtual positions ignored
            named["labels"] = torch.cat([labels.new_full((labels.shape[0], n), -100), labels], dim=1)
        for key in ("start_positions", "end_positions"):
            if named.get(key) is not None:  # index into the real tokens -> into n + T positions
                named[key] = named[key].clamp(min=0) + n  # transformers clamps below at 0 too
        return (), named

    def after(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        n = added_positions(module)
        if n == 0:
            return output
        if not isinstance(output, ModelOutput):  # e.g. config.return_dict = False
            raise ValueError(_TUPLES)
        for key in _OUTPUTS:
            value = getattr(output, key, None)
            if value is not None:
                output[key] = value[:, n:]  # (B, n + T, ...) -> (B, T, ...)
        return output


def align_virtual_positions(model: ModelT) -> ModelT:
    """Install :class:`VirtualPositions` on a prompt / P-tuning model with a per-token head (once).

    A no-op for other models and task types, for peft >= 0.22, and when already installed;
    returns ``model``.
    """
    config = getattr(model, "active_peft_config", None)
    if config is None or config.task_type not in PER_TOKEN_TASKS or added_positions(model) == 0:
        return model
    if getattr(model, _HANDLES, None) is not None or not peft_needs_mends():
        return model
    hooks = VirtualPositions(model)
    handles: tuple[RemovableHandle, RemovableHandle] = (
        model.register_forward_pre_hook(hooks.before, with_kwargs=True),
        model.register_forward_hook(hooks.after, with_kwargs=True),
    )
    setattr(model, _HANDLES, handles)
    return model
