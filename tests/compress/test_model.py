import pytest
import torch
from torch import nn

from deftune.compress import (
    CompressedLinear,
    MSEOptions,
    QuantConfig,
    SparsityConfig,
    compress_,
    compressed_layers,
    decompress_,
    fake_quantize,
    select_linears,
)

N_BLOCK_LINEARS = 12  # 2 layers x (query, key, value, attention out, intermediate, output)


def _inputs(batches):
    return [{k: v for k, v in b.items() if k != "labels"} for b in batches]


def test_default_filter_picks_block_linears(tiny_bert):
    names = list(select_linears(tiny_bert()))
    assert len(names) == N_BLOCK_LINEARS
    assert not any("classifier" in n or "pooler" in n for n in names)


def test_quant_report_and_forward(tiny_bert, tiny_batches):
    model = tiny_bert()
    batch = _inputs(tiny_batches(1))[0]
    report = compress_(model, QuantConfig("int8:ch"), calibration=tiny_batches(2))
    assert len(report.layers) == N_BLOCK_LINEARS
    assert all(isinstance(m, CompressedLinear) for m in compressed_layers(model).values())
    assert all(lr.weight_sqnr_db > 35 and lr.output_rel_error < 0.05 for lr in report.layers)
    layer = compressed_layers(model)["bert.encoder.layer.0.attention.self.query"]
    assert torch.equal(layer.compressed_weight(), fake_quantize(layer.weight.detach(), "int8:ch"))
    with torch.no_grad():
        model(**batch)
    assert "bert.encoder.layer.1.output.dense" in report.table()


def test_sparsity_exact_and_zeroed_latents(tiny_bert):
    model = tiny_bert()
    report = compress_(model, SparsityConfig("unstructured:0.5"))
    for lr in report.layers:
        assert lr.sparsity == pytest.approx(0.5, abs=1e-9)
    for layer in compressed_layers(model).values():
        assert torch.equal(layer.weight == 0, ~layer.compressor.mask)
    report = compress_(tiny_bert(), SparsityConfig("nm:2:4"))
    assert report.sparsity == pytest.approx(0.5)


def test_global_allocation_total(tiny_bert):
    report = compress_(tiny_bert(), SparsityConfig("unstructured:0.7", allocation="global"))
    assert report.sparsity == pytest.approx(0.7, abs=1e-3)
    assert len({lr.pattern for lr in report.layers}) > 1


@pytest.mark.parametrize("method", ["gptq", "mse"])
def test_reconstruction_lowers_output_error(tiny_bert, tiny_batches, method):
    calib = tiny_batches(4)
    fast = MSEOptions(steps=30)
    rtn = compress_(tiny_bert(), QuantConfig("int3:ch"), calibration=calib)
    rec = compress_(tiny_bert(), QuantConfig("int3:ch", reconstruct=method, mse=fast), calibration=calib)
    assert rec.mean_output_error < rtn.mean_output_error
    if method == "mse":
        sp = compress_(tiny_bert(), SparsityConfig("unstructured:0.6"), calibration=calib)
        sp_rec = compress_(tiny_bert(), SparsityConfig("unstructured:0.6", reconstruct="mse", mse=fast), calibration=calib)
        assert sp_rec.mean_output_error < sp.mean_output_error
        assert sp_rec.sparsity == pytest.approx(sp.sparsity)  # refitting keeps the mask


def test_gptq_layers_stay_on_their_grid(tiny_bert, tiny_batches):
    model = tiny_bert()
    compress_(model, QuantConfig("int4:g16:asym", reconstruct="gptq"), calibration=tiny_batches(2))
    for layer in compressed_layers(model).values():
        assert torch.equal(layer.compressed_weight(), layer.weight)  # latent weight is the GPTQ result


def test_config_errors():
    with pytest.raises(ValueError, match="quantization pattern"):
        QuantConfig("nm:2:4")
    with pytest.raises(ValueError, match="sparsity pattern"):
        SparsityConfig("int4")
    with pytest.raises(ValueError, match="reconstruct"):
        SparsityConfig("nm:2:4", reconstruct="gptq")
    with pytest.raises(ValueError, match="allocation"):
        SparsityConfig("unstructured:0.5", allocation="random")


def test_errors_without_calibration_or_targets(tiny_bert):
    with pytest.raises(ValueError, match="calibration"):
        compress_(tiny_bert(), QuantConfig("int4", reconstruct="gptq"))
    with pytest.raises(ValueError, match="selected no"):
        compress_(tiny_bert(), QuantConfig("int4"), filter_fn=lambda m, n: False)


@pytest.mark.parametrize("config", [QuantConfig("int4:g32"), SparsityConfig("nm:2:32"), SparsityConfig("block:16x32:0.5")])
def test_a_pattern_that_fits_no_later_layer_changes_nothing(config):
    """With MLP width 48, the MLP output layer (32, 48) does not fit patterns that the earlier
    (32, 32) and (48, 32) layers fit: compress_ must refuse before it replaces any layer."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
        max_position_embeddings=32)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"output\.dense.*no layer was changed"):
        compress_(model, config)
    assert compressed_layers(model) == {}
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)



def test_a_tied_weight_is_refused_and_nothing_changes():
    """GPT-2's lm_head is the input embedding's weight: compressing it in place would prune the
    embedding as well, so compress_ refuses and names the alias."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=16))
    assert model.lm_head.weight is model.transformer.wte.weight
    before = model.transformer.wte.weight.detach().clone()
    with pytest.raises(ValueError, match=r"'lm_head' shares its weight with \['transformer\.wte\.weight'\].*no layer"):
        compress_(model, SparsityConfig("unstructured:0.5"), filter_fn=lambda m, n: n == "lm_head")
    assert compressed_layers(model) == {} and torch.equal(model.transformer.wte.weight, before)


def test_non_finite_weights_are_refused_before_any_change(tiny_bert):
    model = tiny_bert()
    names = list(select_linears(model))
    with torch.no_grad():
        model.get_submodule(names[-1]).weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=rf"{names[-1]}.*non-finite.*no layer was changed"):
        compress_(model, QuantConfig("int4"))
    assert compressed_layers(model) == {}


def test_a_model_without_linear_layers_names_conv1d():
    from transformers import GPT2Config, GPT2Model

    with pytest.raises(ValueError, match="Conv1D"):
        compress_(GPT2Model(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=16)), QuantConfig("int4"))

def test_filter_and_decompress(tiny_bert, tiny_batches):
    model = tiny_bert()
    report = compress_(model, QuantConfig("int4:ch"), filter_fn=lambda m, n: n.endswith("output.dense"))
    assert len(report.layers) == 4  # attention output + MLP output, 2 layers
    batch = _inputs(tiny_batches(1))[0]
    with torch.no_grad():
        before = model(**batch).logits
    assert decompress_(model) == 4
    assert not compressed_layers(model) and all(type(m) is nn.Linear for m in select_linears(model).values())
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, before, atol=1e-6)


def test_peft_adapters_are_not_compressed(tiny_bert, tiny_batches):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_bert(), LoraConfig(r=4, target_modules=["query", "value"]))
    report = compress_(model, QuantConfig("int4:ch"))
    assert len(report.layers) == N_BLOCK_LINEARS
    assert all("lora_" not in lr.name for lr in report.layers)
    assert sum(lr.name.endswith("base_layer") for lr in report.layers) == 4
    batch = tiny_batches(1)[0]
    model.train()
    model(**batch).loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n or "classifier" in n for n in grads)


def test_default_filter_finds_llama_blocks():
    """Blocks are found by their numbered container: BERT's ``layer.N`` above, LLaMA's ``layers.N``
    here (the head excluded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1))
    names = list(select_linears(llama))
    assert "model.layers.0.mlp.up_proj" in names and len(names) == 2 * 7 and "lm_head" not in names


def test_report_numbers(tiny_bert):
    import json

    report = compress_(tiny_bert(), SparsityConfig("unstructured:0.0"))  # nothing pruned: SQNR infinite
    assert all(lr.fp32_bytes == lr.shape[0] * lr.shape[1] * 4 for lr in report.layers)
    text = report.to_json()

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    data = json.loads(text, parse_constant=refuse)  # no Infinity / NaN in the file
    assert all(lr["weight_sqnr_db"] is None for lr in data["layers"])


def test_reconstruction_needs_a_frozen_grid_and_zero_steps_is_round_to_nearest(tiny_bert, tiny_batches):
    with pytest.raises(ValueError, match="reconstruction fixes the quantization grid: it needs freeze=True"):
        QuantConfig("int4", reconstruct="mse", freeze=False)
    calib = tiny_batches(2)
    a, b = tiny_bert(), tiny_bert()
    compress_(a, QuantConfig("int3:ch"), calibration=calib)
    compress_(b, QuantConfig("int3:ch", reconstruct="mse", mse=MSEOptions(steps=0)), calibration=calib)
    for (name, la), lb in zip(compressed_layers(a).items(), compressed_layers(b).values()):
        assert torch.equal(la.compressed_weight(), lb.compressed_weight()), name


def test_sequential_reconstruction_captures_each_block_after_the_earlier_ones(tiny_bert, tiny_batches, monkeypatch):
    import deftune.compress.model as cm

    calls = []
    real = cm.capture_inputs
    monkeypatch.setattr(cm, "capture_inputs", lambda model, layers, *a, **k: calls.append(sorted(layers)) or real(model, layers, *a, **k))
    compress_(tiny_bert(), QuantConfig("int4:ch", reconstruct="gptq"), calibration=tiny_batches(2))
    assert len(calls) == 2 and all(len(c) == 6 for c in calls)  # one capture per block
    assert all(".layer.0." in n for n in calls[0]) and all(".layer.1." in n for n in calls[1])
    calls.clear()
    compress_(tiny_bert(), QuantConfig("int4:ch", reconstruct="gptq", sequential=False), calibration=tiny_batches(2))
    assert len(calls) == 1 and len(calls[0]) == N_BLOCK_LINEARS


def test_decompressing_without_materialising_shares_the_latent_weight(tiny_bert):
    model = tiny_bert()
    compress_(model, QuantConfig("int4:ch"))
    layer = next(iter(compressed_layers(model).values()))
    plain = layer.to_linear(materialize=False)
    assert plain.weight is layer.weight and plain.bias is layer.bias
    assert not torch.equal(layer.to_linear(materialize=True).weight, layer.weight)
