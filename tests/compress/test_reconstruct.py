"""Calibration capture: each layer sees its own stack's real tokens."""

import pytest
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



def test_a_seq2seq_batch_with_labels_only_feeds_the_decoder_and_masks_it_by_the_labels():
    """T5 builds its decoder input from ``labels`` (shifted right): calibration must keep them in the
    call, and count the decoder's tokens by ``labels != -100`` (8 - 1 = 7 here)."""
    model = _t5()
    ids = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    labels = torch.randint(1, 64, (2, 4), generator=torch.Generator().manual_seed(1))
    labels[0, 3:] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    seen = capture_inputs(model, _layers(model), [batch], hessian=False)
    assert (seen["enc_wi"].n_tokens, seen["dec_wi"].n_tokens) == (14, 7)
    shifted = model._shift_right(labels)  # what the decoder's layers must have seen
    direct = capture_inputs(model, _layers(model), [{**batch, "decoder_input_ids": shifted}], hessian=False)
    torch.testing.assert_close(seen["dec_wi"].samples.sort(0).values, direct["dec_wi"].samples.sort(0).values)

def _linear_model():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(x)

    return M()


def test_the_hessian_sums_every_batch_and_every_batch_gives_samples():
    """H = 2 XᵀX / N over all calibration tokens; the sample takes rows from each batch."""
    model = _linear_model()
    g = torch.Generator().manual_seed(0)
    batches = [{"x": torch.randn(1, 6, 3, generator=g)} for _ in range(4)]
    seen = capture_inputs(model, {"lin": model.lin}, batches, hessian=True, max_samples=8)["lin"]
    x = torch.cat([b["x"].reshape(-1, 3) for b in batches])
    torch.testing.assert_close(seen.hessian, 2.0 * x.T @ x / 24)
    assert seen.n_tokens == 24 and seen.samples.shape == (8, 3)
    rows = {tuple(r.tolist()) for r in seen.samples}
    per_batch = [sum(tuple(r.tolist()) in rows for r in b["x"].reshape(-1, 3)) for b in batches]
    assert per_batch == [2, 2, 2, 2]


def _int3_layer(scale: float = 1.0):
    """``(W (16, 32), correlated inputs X (512, 32), int3 per-row quantizer f of W)``."""
    from deftune.compress import QuantCompressor, choose_qparams, parse_quant

    g = torch.Generator().manual_seed(1)
    w = scale * torch.randn(16, 32, generator=g)
    x = torch.randn(512, 32, generator=g) @ torch.randn(32, 32, generator=g)
    return w, x, QuantCompressor(parse_quant("int3:ch"), choose_qparams(w, "int3:ch"))


def test_mse_reconstruction_options_and_its_last_step():
    from deftune.compress import MSEOptions, reconstruct_mse

    with pytest.raises(ValueError, match="steps >= 0"):
        MSEOptions(steps=-1)
    w, x, f = _int3_layer()
    # 5 steps, checked only at the last one (eval_every 10): the result is that step's weight, not W
    out = reconstruct_mse(w, x, f, MSEOptions(steps=5, eval_every=10))
    assert not torch.equal(out, w)


@pytest.mark.parametrize("scale", [1.0, 1e-3])
def test_mse_reconstruction_works_at_any_weight_scale(scale):
    """The step size follows the weight's spread (lr × std W): tiny weights improve as much."""
    from deftune.compress import MSEOptions, reconstruct_mse
    from deftune.compress.reconstruct import output_error

    w, x, f = _int3_layer(scale)
    before = output_error(w, f(w), x)
    after = output_error(w, f(reconstruct_mse(w, x, f, MSEOptions(steps=30))), x)
    assert after < 0.9 * before  # 0.85 at both scales
