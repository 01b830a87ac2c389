"""``token_type_ids`` and ``position_ids`` carried through peft 0.21's extractive-QA model.

``PeftModelForQuestionAnswering.forward`` (peft 0.21) names ``token_type_ids`` and
``position_ids`` as parameters and never passes them on, for every peft method: a BERT question
answerer then sees every token as segment 0, whatever the tokenizer said
(``tests/methods/test_qa_inputs.py`` checks that peft's outputs do not change with them). deftune's own methods (bottleneck adapters, BitFit) and its prefix tuning (a plain
``PeftModel``) pass them on already.

:class:`QAInputs` carries them around peft's forward: a pre-hook on the peft model takes them out
of the call, a pre-hook on the task model inside puts them back, and a hook that runs after
peft's forward (also when it raises an ``Exception``; torch skips it on ``KeyboardInterrupt``, and
the next call through peft overwrites what was left) drops whatever was not delivered. With prompt / P-tuning
the task model reads n virtual tokens first: ``token_type_ids`` get n leading zeros (what peft
does for the other task heads), and ``position_ids`` are dropped with peft's own warning, as peft
drops them for prompt learning elsewhere. ``merge_and_unload()`` returns the task model with
its pre-hook still on; with nothing left to carry, it passes every call through unchanged.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from deftune.methods.call_args import CallArguments
from deftune.methods.peft_compat import ModelT, peft_needs_mends
from deftune.methods.virtual_positions import added_positions

CARRIED: tuple[str, ...] = ("token_type_ids", "position_ids")
_HANDLES = "_deftune_qa_input_hooks"


class QAInputs:
    """The three hooks; ``pending`` holds one call's carried inputs between the first two, and
    ``virtual`` the number of virtual tokens the task model will read before the real ones."""

    def __init__(self, peft_model: nn.Module) -> None:
        self.outer = CallArguments(peft_model.forward)
        self.inner = CallArguments(peft_model.get_base_model().forward)
        self.pending: dict[str, Any] = {}
        self.virtual = 0

    def take(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple, dict]:
        named = self.outer.bind(args, kwargs)
        self.pending = {key: named.pop(key) for key in CARRIED if named.get(key) is not None}
        self.virtual = added_positions(module)
        return (), named

    def give(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
        if not self.pending:
            return None
        carried, self.pending = self.pending, {}
        named = self.inner.bind(args, kwargs)
        n = self.virtual
        segments = carried.get("token_type_ids")
        if segments is not None:  # (B, T) -> (B, n + T): the virtual tokens are segment 0
            named["token_type_ids"] = torch.cat([segments.new_zeros(segments.shape[0], n), segments], dim=1)
        if carried.get("position_ids") is not None:
            if n:
                warnings.warn("Position ids are not supported for parameter efficient tuning. Ignoring position ids.",
                              stacklevel=2)
            else:
                named["position_ids"] = carried["position_ids"]
        return (), named

    def drop(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        self.pending = {}


def carry_qa_inputs(model: ModelT) -> ModelT:
    """Install :class:`QAInputs` on a peft extractive-QA model (once); returns ``model``.

    A no-op for other models, for peft >= 0.22, and when already installed.
    """
    from peft import PeftModelForQuestionAnswering

    if not isinstance(model, PeftModelForQuestionAnswering) or getattr(model, _HANDLES, None) is not None:
        return model
    if not peft_needs_mends():
        return model
    hooks = QAInputs(model)
    handles = (
        model.register_forward_pre_hook(hooks.take, with_kwargs=True),
        model.get_base_model().register_forward_pre_hook(hooks.give, with_kwargs=True),
        model.register_forward_hook(hooks.drop, with_kwargs=True, always_call=True),
    )
    setattr(model, _HANDLES, handles)
    return model
