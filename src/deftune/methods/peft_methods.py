"""LoRA, DoRA, IA3, prefix tuning, prompt tuning and P-tuning, through ``peft``.

We wrap peft (``get_peft_model``) rather than register new peft types (impossible from outside
peft). Each method is a small builder ``(model, MethodConfig, task_type) -> (PeftConfig, resolved
MethodConfig)``; apply / save / load / merge are the same peft calls for all of them.

* LoRA (Hu et al. 2021, arXiv 2106.09685): ``W + (lora_alpha / r) B A``, ``B = 0`` at start.
* DoRA (Liu et al. 2024, arXiv 2402.09353): LoRA on the direction, a learned magnitude vector.
* IA3 (Liu et al. 2022, arXiv 2205.05638): learned vectors rescaling keys, values and the MLP's
  intermediate activation (the *input* of the down projection; ones at start).
* Prefix tuning (Li & Liang 2021, arXiv 2101.00190): learned keys / values prepended in every
  layer; adds no positions to activations.
* Prompt tuning (Lester et al. 2021, arXiv 2104.08691): learned input embeddings prepended.
* P-tuning (Liu et al. 2021, arXiv 2103.10385): prompt embeddings produced by an MLP encoder.

With ``task_type="SEQ_CLS"`` peft adds the classification head (``classifier`` / ``score``) to
``modules_to_save``, so it trains and is saved with the adapter — also for the prompt methods.
Prefix tuning with a task head (``SEQ_CLS``, ``TOKEN_CLS``, ``QUESTION_ANS``) is a plain
``PeftModel`` whose prefix deftune feeds to the backbone itself (:mod:`deftune.methods.prefix_cache`:
peft's own path there needs the argument name ``past_key_values``, which transformers 5.24
renamed); the head is then listed in ``modules_to_save`` here, as peft would add it. Causal-LM
and seq2seq prompt-learning models get :func:`~deftune.methods.prompt_generate.mend_generate`,
without which peft 0.21's ``generate()`` misreads transformers 5.24's generation cache; prompt /
P-tuning with a per-token head (token classification, extractive QA) gets
:func:`~deftune.methods.virtual_positions.align_virtual_positions`, without which peft 0.21 leaves
its targets and outputs on the wrong positions; extractive-QA models get
:func:`~deftune.methods.qa_inputs.carry_qa_inputs`, without which peft 0.21 drops
``token_type_ids`` and ``position_ids``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from peft import (
    IA3Config,
    LoraConfig,
    PeftConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    PromptTuningInit,
    get_peft_model,
)
from peft.utils import PeftType, load_peft_weights, set_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from deftune.methods.config import MethodConfig
from deftune.methods.prefix_cache import PREFIX_BY_HOOK, feed_prefix
from deftune.methods.prompt_generate import mend_generate
from deftune.methods.qa_inputs import carry_qa_inputs
from deftune.methods.registry import Method, register_method
from deftune.methods.targets import (
    family_targets,
    freeze_all,
    head_module_names,
    infer_task_type,
    matches,
    mlp_output_paths,
    resolve_modules,
)
from deftune.methods.virtual_positions import added_positions, align_virtual_positions
from deftune.runs import write_safetensors_atomic

Builder = Callable[[nn.Module, MethodConfig, str], tuple[PeftConfig, MethodConfig]]


def _extra_modules(cfg: MethodConfig) -> list[str] | None:
    return list(cfg.modules_to_save) if cfg.modules_to_save else None


def _fan_in_fan_out(model: nn.Module, targets: tuple[str, ...]) -> bool:
    modules = dict(model.named_modules())
    paths = resolve_modules(model, targets, "target_modules")
    return any(isinstance(modules[p], Conv1D) for p in paths)


def _lora_builder(use_dora: bool) -> Builder:
    def build(model: nn.Module, cfg: MethodConfig, task: str) -> tuple[PeftConfig, MethodConfig]:
        targets = cfg.target_modules or family_targets(model).query_value
        peft_config = LoraConfig(
            task_type=task,
            r=cfg.r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            bias=cfg.lora_bias,
            target_modules=list(targets),
            fan_in_fan_out=_fan_in_fan_out(model, targets),
            use_dora=use_dora,
            modules_to_save=_extra_modules(cfg),
        )
        return peft_config, cfg.replace(target_modules=targets, task_type=task)

    return build


def _ia3(model: nn.Module, cfg: MethodConfig, task: str) -> tuple[PeftConfig, MethodConfig]:
    mlp_out = tuple(mlp_output_paths(model))
    targets = cfg.target_modules or family_targets(model).key_value + mlp_out
    if not cfg.feedforward_modules:
        # the MLP down projections among the targets (names match paths as peft matches them), by
        # full path: a short name such as "output.dense" also matches attention outputs, which must
        # keep IA3's output scaling; peft wants them in target_modules too
        feedforward = tuple(p for p in mlp_out if matches(p, targets))
        targets = tuple(targets) + tuple(p for p in feedforward if p not in targets)
    else:
        feedforward = cfg.feedforward_modules
    peft_config = IA3Config(
        task_type=task,
        target_modules=list(targets),
        feedforward_modules=list(feedforward),
        fan_in_fan_out=_fan_in_fan_out(model, targets),
        modules_to_save=_extra_modules(cfg),
    )
    return peft_config, cfg.replace(target_modules=targets, feedforward_modules=feedforward, task_type=task)


def _prefix(model: nn.Module, cfg: MethodConfig, task: str) -> tuple[PeftConfig, MethodConfig]:
    extra = {"encoder_hidden_size": cfg.encoder_hidden_size} if cfg.encoder_hidden_size else {}
    if task in PREFIX_BY_HOOK:  # deftune feeds the prefix (prefix_cache); the head trains as peft's would
        heads = head_module_names(model, task, cfg.modules_to_save)
        peft_task, to_save = None, list(heads) or None
    else:
        peft_task, to_save = task, _extra_modules(cfg)
    peft_config = PrefixTuningConfig(
        task_type=peft_task,
        num_virtual_tokens=cfg.num_virtual_tokens,
        prefix_projection=cfg.prefix_projection,
        modules_to_save=to_save,
        **extra,
    )
    return peft_config, cfg.replace(task_type=task)


def _prompt(model: nn.Module, cfg: MethodConfig, task: str) -> tuple[PeftConfig, MethodConfig]:
    # random initialisation of the virtual token embeddings, as in the DEFT scripts (peft's default);
    # "vocab": peft's SAMPLE_VOCAB, a uniform draw of vocabulary embeddings (torch's global generator)
    start = PromptTuningInit.SAMPLE_VOCAB if cfg.prompt_init == "vocab" else PromptTuningInit.RANDOM
    peft_config = PromptTuningConfig(
        task_type=task, num_virtual_tokens=cfg.num_virtual_tokens, prompt_tuning_init=start,
        modules_to_save=_extra_modules(cfg),
    )
    return peft_config, cfg.replace(task_type=task)


def _ptuning(model: nn.Module, cfg: MethodConfig, task: str) -> tuple[PeftConfig, MethodConfig]:
    extra = {"encoder_hidden_size": cfg.encoder_hidden_size} if cfg.encoder_hidden_size else {}
    peft_config = PromptEncoderConfig(
        task_type=task,
        num_virtual_tokens=cfg.num_virtual_tokens,
        encoder_reparameterization_type="MLP",
        modules_to_save=_extra_modules(cfg),
        **extra,
    )
    return peft_config, cfg.replace(task_type=task)


# ---- the shared life cycle --------------------------------------------------------------------


def _peft_model(model: nn.Module) -> PeftModel:
    if not isinstance(model, PeftModel):
        raise TypeError(f"expected a peft PeftModel (from apply_method), got {type(model).__name__}")
    return model


def _mended(peft_model: PeftModel) -> PeftModel:
    """peft's model with deftune's mends of peft 0.21 (each a no-op where it does not apply)."""
    return carry_qa_inputs(align_virtual_positions(mend_generate(peft_model)))


def _apply(builder: Builder) -> Callable[[nn.Module, MethodConfig], tuple[nn.Module, MethodConfig]]:
    def apply(model: nn.Module, cfg: MethodConfig) -> tuple[nn.Module, MethodConfig]:
        task = cfg.task_type or infer_task_type(model)
        peft_config, resolved = builder(model, cfg, task)
        if peft_config.task_type is None:  # prefix tuning with a task head: deftune feeds the prefix
            return feed_prefix(PeftModel(model, peft_config)), resolved
        return _mended(get_peft_model(model, peft_config)), resolved

    return apply


PROMPT_ENCODER_FILE = "prompt_encoder.safetensors"


def _save(model: nn.Module, directory: Path) -> None:
    peft_model = _peft_model(model)
    peft_model.save_pretrained(str(directory))
    if peft_model.active_peft_config.is_prompt_learning:
        # peft saves the *computed* virtual tokens (P-tuning's MLP and prefix tuning's projection are
        # dropped): enough for inference, not for resuming training. Keep the encoder itself too.
        encoder = peft_model.prompt_encoder[peft_model.active_adapter]
        tensors = {k: v.detach().contiguous() for k, v in encoder.state_dict().items()}
        write_safetensors_atomic(directory / PROMPT_ENCODER_FILE, tensors)


def _loader(builder: Builder) -> Callable[[nn.Module, Path, MethodConfig, bool], nn.Module]:
    apply = _apply(builder)

    def load(model: nn.Module, directory: Path, cfg: MethodConfig, trainable: bool) -> nn.Module:
        if not trainable:
            config = PeftConfig.from_pretrained(str(directory))
            hooked = config.peft_type == PeftType.PREFIX_TUNING and (
                config.task_type is None or config.task_type in PREFIX_BY_HOOK
            )
            if hooked:  # also runs saved with peft's own SEQ_CLS path (task_type kept in the file)
                config.task_type = None
            loaded = PeftModel.from_pretrained(model, str(directory), is_trainable=False, config=config)
            freeze_all(loaded)  # peft 0.21 leaves prompt-learning encoders trainable in inference mode
            return feed_prefix(loaded) if hooked else _mended(loaded)
        if cfg.name not in _PROMPT_LEARNING:
            return _mended(PeftModel.from_pretrained(model, str(directory), is_trainable=True))
        # peft refuses is_trainable=True for prompt learning: re-apply, then load head and encoder.
        # The saved "prompt_embeddings" are the *computed* tokens (after a prefix projection or
        # P-tuning's MLP, of another shape than the encoder's input embedding): the encoder file
        # below restores the encoder itself, so the head is loaded with the embedding left as it is.
        peft_model, _ = apply(model, cfg)
        device = str(next(model.parameters()).device)
        encoder = peft_model.prompt_encoder[peft_model.active_adapter]
        weights = load_peft_weights(str(directory), device=device)
        weights["prompt_embeddings"] = encoder.embedding.weight.detach()
        set_peft_model_state_dict(peft_model, weights)
        encoder.load_state_dict(load_file(str(directory / PROMPT_ENCODER_FILE), device=device))
        return peft_model

    return load


def _merge(model: nn.Module) -> None:
    _peft_model(model).merge_adapter()


def _unmerge(model: nn.Module) -> None:
    _peft_model(model).unmerge_adapter()


def _prompt_positions(model: nn.Module) -> int:
    return added_positions(_peft_model(model))


_PROMPT_LEARNING = ("prefix", "prompt", "ptuning")
_PROMPT_NOTE = (
    "{name} adds learned virtual tokens / keys and values, not a weight update: there is nothing "
    "to fold into the base weights"
)
_SPECS: dict[str, tuple[Builder, bool, str]] = {
    "lora": (_lora_builder(use_dora=False), True, "LoRA low-rank update of query/value (peft)"),
    "dora": (_lora_builder(use_dora=True), True, "DoRA: LoRA direction + learned magnitude (peft)"),
    "ia3": (_ia3, True, "IA3: learned rescaling of keys, values and MLP activations (peft)"),
    "prefix": (_prefix, False, "prefix tuning: learned keys/values in every layer (peft)"),
    "prompt": (_prompt, False, "prompt tuning: learned input embeddings prepended (peft)"),
    "ptuning": (_ptuning, False, "P-tuning: prompt embeddings from an MLP encoder (peft)"),
}

for _name, (_builder, _mergeable, _summary) in _SPECS.items():
    register_method(
        Method(
            name=_name,
            apply=_apply(_builder),
            save=_save,
            load=_loader(_builder),
            merge=_merge if _mergeable else None,
            unmerge=_unmerge if _mergeable else None,
            merge_note="" if _mergeable else _PROMPT_NOTE.format(name=_name),
            virtual_tokens=_prompt_positions,
            summary=_summary,
        )
    )
