"""benchmarks/decode.py's decoding step: eager and torch.compile'd paths against the model's forward.

Runs on CPU with a tiny random LLaMA (the benchmark itself needs CUDA for its graphs and timing);
the step's arithmetic is the same on both devices.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

DECODE = Path(__file__).resolve().parents[2] / "benchmarks" / "decode.py"


def _load_decode():
    spec = importlib.util.spec_from_file_location("decode_benchmark", DECODE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="torch.compile needs a C compiler")
@pytest.mark.parametrize("compiled, dense_mlp", [(False, False), (True, False), (True, True)])
def test_decoding_step_matches_the_model_forward(compiled, dense_mlp):
    decode = _load_decode()
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (6,))
    with torch.no_grad():
        dec = decode.StaticDecoder(model, max_len=16, compiled=compiled)
        dec.use_compiled_dense_mlp = dense_mlp
        for t in ids.tolist():  # token by token through the static cache
            dec.tok.fill_(t)
            dec.step()
        ref = model(input_ids=ids[None]).logits[0, -1]
    assert int(dec.pos) == len(ids)
    assert torch.allclose(dec.logits[0], ref, atol=1e-4, rtol=1e-4)
    assert int(dec.tok[0]) == int(ref.argmax())
