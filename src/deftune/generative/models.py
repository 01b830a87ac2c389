"""Generative models by name: SmolLM2 (real weights), tiny random LLaMA / GPT-2 / T5, or a folder.

The tiny models are built in code with random weights and a small byte-level BPE tokenizer
trained on the fly (a few milliseconds), so tests need no download. ``tiny-llama-relu`` is the
tiny LLaMA with a ReLU gate (exact zeros to count).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

from torch import nn

PAD, EOS, BOS = "<pad>", "<eos>", "<bos>"
_CORPUS = (
    "The quick brown fox jumps over the lazy dog. Context: Question: Answer: What is the capital of "
    "France? Paris is the capital and the largest city of France. Super Bowl 50 was an American football "
    "game played in 1966 by the Denver Broncos. Who wrote it? When did it happen? How many people live "
    "there? 0123456789"
)


@lru_cache(maxsize=1)
def tiny_tokenizer():
    """A byte-level BPE tokenizer (vocabulary 384) with ``<pad>``, ``<eos>``, ``<bos>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384, special_tokens=[PAD, EOS, BOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, bos_token=BOS)


def _tiny_llama(act: str = "silu") -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, hidden_act=act, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def _tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = tiny_tokenizer()
    config = GPT2Config(
        vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=512, activation_function="relu",
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
    )
    return GPT2LMHeadModel(config)


def _tiny_t5() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    tok = tiny_tokenizer()
    config = T5Config(
        vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        feed_forward_proj="relu", pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id,
    )
    return T5ForConditionalGeneration(config)


TINY_MODELS: dict[str, Callable[[], nn.Module]] = {
    "tiny-llama": _tiny_llama,
    "tiny-llama-relu": lambda: _tiny_llama("relu"),
    "tiny-gpt2": _tiny_gpt2,
    "tiny-t5": _tiny_t5,
}


def load_generative(name: str, seed: int = 0):
    """``(model, tokenizer)`` for ``name`` in fp32, eval mode (see module docstring)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    if name in TINY_MODELS:
        torch.manual_seed(seed)
        return TINY_MODELS[name]().eval(), tiny_tokenizer()
    from deftune.arch import spec_of_model_type
    from deftune.models import resolve

    path, overrides = resolve(name)
    config = AutoConfig.from_pretrained(path, **overrides)
    # an encoder-only model (BERT, RoBERTa, ...) would load as a causal LM (BertLMHeadModel) without
    # complaint, but it was not trained to generate
    spec = spec_of_model_type(config.model_type)
    if spec is not None and spec.encoder_only:
        raise ValueError(
            f"model {name!r} is an encoder-only {config.model_type!r} model: generative QA needs a decoder "
            f"(smollm2, or a LLaMA / GPT-2 / OPT folder) or an encoder-decoder (T5); choose one of "
            f"smollm2, {', '.join(TINY_MODELS)} or a model folder"
        )
    cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    model = cls.from_pretrained(path, config=config, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer
