"""Calibration capture: each layer sees its own stack's real tokens."""

import torch

from deftune.compress import capture_inputs


def _t5():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                               num_decoder_layers=1, num_heads=2, decoder_start_token_id=0)).eval()


def _layers(model):
    return {"enc_wi": model.encoder.block[0].layer[1].DenseReluDense.wi,
            "dec_wi": model.decoder.block[0].layer[2].DenseReluDense.wi}


def test_decoder_layers_are_masked_by_the_decoder_tokens():
    """Encoder (2, 7) with 2 pads -> 12 tokens; decoder (2, 4): 8 tokens unless its own mask pads some.
    The encoder's mask must never be laid over the decoder's positions."""
    model = _t5()
    ids = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    dec = torch.randint(1, 64, (2, 4), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec}
    seen = capture_inputs(model, _layers(model), [batch], hessian=False)
    assert (seen["enc_wi"].n_tokens, seen["dec_wi"].n_tokens) == (12, 8)

    dec_mask = torch.ones_like(dec)
    dec_mask[0, 3:] = 0
    seen = capture_inputs(model, _layers(model), [{**batch, "decoder_attention_mask": dec_mask}], hessian=False)
    assert (seen["enc_wi"].n_tokens, seen["dec_wi"].n_tokens) == (12, 7)
