import pytest
import torch
from torch import nn

from deftune.compress import (
    PackedLinear,
    QuantConfig,
    choose_qparams,
    compress_,
    pack_,
    pack_int4,
    parse_quant,
    quantize,
    unpack_int4,
)


@pytest.mark.parametrize("n", [1, 2, 7, 64])
def test_int4_round_trip(n):
    codes = torch.randint(0, 16, (3, n), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (3, (n + 1) // 2) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed, n), codes)


def test_int4_nibble_order_by_hand():
    assert pack_int4(torch.tensor([[0x1, 0xA]], dtype=torch.uint8)).tolist() == [[0xA1]]


def test_pack_rejects_wide_codes():
    with pytest.raises(ValueError, match="0..15"):
        pack_int4(torch.tensor([16], dtype=torch.uint8))


@pytest.mark.parametrize("text", ["int4:g16:asym", "int4:ch", "int8:ch", "int3:g8", "int6:ch1:asym"])
def test_packed_linear_equals_fake_quantized_linear(text):
    torch.manual_seed(0)
    lin = nn.Linear(32, 10)
    params = choose_qparams(lin.weight, text)
    packed = PackedLinear(quantize(lin.weight, params), params, lin.bias)
    from deftune.compress import fake_quantize

    assert torch.equal(packed.dequantized_weight(), fake_quantize(lin.weight.detach(), params))


def test_pack_model_outputs_and_bytes(tiny_bert, tiny_batches):
    model = tiny_bert()
    batch = tiny_batches(1)[0]
    batch.pop("labels")
    compress_(model, QuantConfig("int4:g16:asym"))
    with torch.no_grad():
        fake = model(**batch).logits
    report = pack_(model)
    with torch.no_grad():
        real = model(**batch).logits
    assert torch.equal(fake, real)
    assert len(report.layers) == 12 and all(isinstance(m, PackedLinear) for m in _packed(model))
    assert report.ratio <= 0.3
    # the bytes are the buffers' real sizes
    assert report.packed_bytes == sum(m.packed.nbytes + m.scale.nbytes + m.zero_point.nbytes for m in _packed(model))


def test_int8_ratio(tiny_bert):
    model = tiny_bert()
    compress_(model, QuantConfig("int8:ch"))
    assert 0.25 <= pack_(model).ratio <= 0.3


def _packed(model):
    return [m for m in model.modules() if isinstance(m, PackedLinear)]


def test_five_bits_and_more_go_in_a_byte():
    torch.manual_seed(0)
    lin = nn.Linear(32, 10)
    from deftune.compress import fake_quantize

    for text, container in (("int4:ch", 4), ("int5:ch", 8)):
        params = choose_qparams(lin.weight, text)
        packed = PackedLinear(quantize(lin.weight, params), params, lin.bias)
        assert packed.container_bits == container
        assert torch.equal(packed.dequantized_weight(), fake_quantize(lin.weight.detach(), params))


def test_packing_keeps_a_mask_in_front_of_the_quantizer(tiny_bert, tiny_batches):
    """A layer pruned then quantized: the packed weight is the quantized *masked* weight."""
    from deftune.compress import SparsityConfig

    model = tiny_bert()
    batch = {k: v for k, v in tiny_batches(1)[0].items() if k != "labels"}
    compress_(model, SparsityConfig("unstructured:0.5"))
    from deftune.compress import compressed_layers
    from deftune.compress.layer import QuantCompressor

    for layer in compressed_layers(model).values():  # stack a quantizer behind each mask
        q = QuantCompressor(parse_quant("int4:ch"), choose_qparams(layer.compressor(layer.weight), "int4:ch"))
        with torch.no_grad():  # pruned latent weights that training moved: only the mask zeroes them
            layer.weight[~layer.compressor.mask] = 0.3
        layer.compressor = nn.Sequential(layer.compressor, q)
    with torch.no_grad():
        fake = model(**batch).logits
    pack_(model)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, fake)
