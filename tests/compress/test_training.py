import pytest
import torch

from deftune.compress import QuantConfig, SparsityConfig, compressed_layers
from deftune.compress.training import (
    CompressionExtension,
    DynamicSchedule,
    DynamicSparsity,
    FinetuneConfig,
    GradualPruning,
    PruningSchedule,
    finetune,
    freeze_quantizers_,
    polynomial_sparsity,
)


def test_polynomial_schedule_by_hand():
    # s_t = s_f + (s_i - s_f) (1 - (t - t0) / (t1 - t0))^3 with s_i = 0, s_f = 0.8, t0 = 0, t1 = 100
    assert polynomial_sparsity(0, 0.8, 0, 100) == 0.0
    assert polynomial_sparsity(50, 0.8, 0, 100) == pytest.approx(0.8 - 0.8 * 0.125)
    assert polynomial_sparsity(100, 0.8, 0, 100) == 0.8
    assert polynomial_sparsity(500, 0.8, 0, 100) == 0.8


def test_gradual_pruning_reaches_target(tiny_bert, tiny_batches):
    model = tiny_bert()
    gmp = GradualPruning(PruningSchedule("unstructured:0.6", start_step=0, end_step=12, every=4))
    seen = []

    class Spy:
        def prepare(self, m): ...
        def extra_loss(self, m, step):
            seen.append(gmp.sparsity())
        def trainable_parameters(self):
            return []

    finetune(model, tiny_batches(4), FinetuneConfig(steps=16, lr=1e-3, warmup_steps=0), [gmp, Spy()])
    assert gmp.sparsity() == pytest.approx(0.6, abs=1e-3)
    assert seen == sorted(seen) and seen[0] == 0.0 and 0 < seen[5] < 0.6  # monotone ramp
    for layer in compressed_layers(model).values():
        assert torch.all(layer.weight[~layer.compressor.mask] == 0)


@pytest.mark.parametrize("algorithm", ["set", "rigl"])
def test_dynamic_sparsity_constant_and_changing(tiny_bert, tiny_batches, algorithm):
    model = tiny_bert()
    ext = DynamicSparsity(DynamicSchedule(algorithm, sparsity=0.7, every=3, drop_fraction=0.3, end_step=20))
    ext.prepare(model)
    before = {n: m.compressor.mask.clone() for n, m in compressed_layers(model).items()}
    ext.prepare = lambda m: None  # already prepared
    finetune(model, tiny_batches(4), FinetuneConfig(steps=12, lr=1e-3, warmup_steps=0), [ext])
    after = {n: m.compressor.mask for n, m in compressed_layers(model).items()}
    assert ext.updates == 3 and ext.changed > 0
    for n in before:
        assert int(after[n].sum()) == int(before[n].sum())  # constant sparsity per layer
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert ext.sparsity() == pytest.approx(0.7, abs=1e-3)
    assert not ext._handles  # hooks removed by finetune's close()


def test_rigl_grows_where_the_gradient_is_large(tiny_bert):
    model = tiny_bert()
    ext = DynamicSparsity(DynamicSchedule("rigl", sparsity=0.5, every=1, drop_fraction=0.2, end_step=10))
    ext.prepare(model)
    name, layer = next(iter(compressed_layers(model).items()))
    inactive = ~layer.compressor.mask
    grad = torch.zeros_like(layer.weight)
    grad[inactive] = torch.rand(int(inactive.sum()))
    ext._grads = {n: torch.zeros_like(m.weight) for n, m in compressed_layers(model).items()}
    ext._grads[name] = grad
    with torch.no_grad():  # the dense (STE) gradient lets an optimizer step move pruned latent weights
        layer.weight[inactive] = 0.5
    magnitude, before = layer.weight.detach().abs().clone(), layer.compressor.mask.clone()
    ext.update(step=1)
    grown = layer.compressor.mask & inactive
    n = int(grown.sum())
    assert n > 0
    assert grad[grown].min() >= torch.topk(grad[inactive], n).values.min()
    assert torch.all(layer.weight[grown] == 0)  # new connections start at zero
    # what is dropped is the smallest-magnitude active weights, as many as are grown
    dropped, kept = before & ~layer.compressor.mask, before & layer.compressor.mask
    assert int(dropped.sum()) == n
    assert magnitude[dropped].max() <= magnitude[kept].min()


def test_quantization_aware_training_trains_latent_weights(tiny_bert, tiny_batches):
    model = tiny_bert()
    ext = CompressionExtension(QuantConfig("int4:ch", freeze=False))
    w0 = model.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    losses = finetune(model, tiny_batches(2), FinetuneConfig(steps=30, lr=3e-3, warmup_steps=0), [ext])
    layer = compressed_layers(model)["bert.encoder.layer.0.attention.self.query"]
    assert not torch.equal(layer.weight, w0)  # gradients reached the latent weights through the STE
    assert sum(losses[-5:]) < sum(losses[:5])
    assert freeze_quantizers_(model) == 12 and layer.compressor.frozen


def test_freezing_a_quantizer_behind_a_mask_keeps_the_output():
    """mask -> quant: the dynamic scales come from the masked weight, so the frozen ones must too. A
    large pruned column would otherwise set the frozen scale (16x too coarse here)."""
    from torch import nn

    from deftune.compress import (
        CompressedLinear,
        MaskCompressor,
        QuantCompressor,
        compute_mask,
        parse_pattern,
    )

    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    with torch.no_grad():
        lin.weight[:, 0] = 5.0
    pattern = parse_pattern("channel:0.0625:cols")  # prune one column of 16
    score = torch.ones_like(lin.weight)
    score[:, 0] = 0.0  # ... the large one
    mask = compute_mask(lin.weight, pattern, score=score)
    layer = CompressedLinear(lin, nn.Sequential(MaskCompressor(pattern, mask), QuantCompressor(parse_pattern("int4:ch"))))
    x = torch.randn(4, 16)
    with torch.no_grad():
        dynamic = layer(x)
        assert freeze_quantizers_(layer) == 1 and layer.compressor[1].frozen
        torch.testing.assert_close(layer(x), dynamic, rtol=0, atol=1e-6)


def test_sparsity_aware_training_keeps_the_mask(tiny_bert, tiny_batches):
    model = tiny_bert()
    ext = CompressionExtension(SparsityConfig("nm:2:4"))
    finetune(model, tiny_batches(2), FinetuneConfig(steps=5, lr=1e-3, warmup_steps=0), [ext])
    ext.extra_loss(model, 5)  # the projection that would open the next step
    for layer in compressed_layers(model).values():
        groups = (layer.weight != 0).reshape(-1, 4).sum(dim=1)
        assert torch.all(groups <= 2)


def test_schedule_validation():
    with pytest.raises(ValueError, match="fraction-based"):
        PruningSchedule("nm:2:4")
    with pytest.raises(ValueError, match="algorithm"):
        DynamicSchedule("magic")
    for schedule in (PruningSchedule, DynamicSchedule):
        with pytest.raises(ValueError, match=r"allocation 'bogus' is not one of \['uniform', 'global', 'erk'\]"):
            schedule(allocation="bogus")


def test_qlora_style_peft_on_a_frozen_quantized_base(tiny_bert, tiny_batches):
    from peft import LoraConfig, get_peft_model

    from deftune.compress import CompressedLinear, QuantCompressor
    from deftune.train import TrainExtension

    model = get_peft_model(tiny_bert(), LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"]))
    ext = CompressionExtension(QuantConfig("int4:g16:asym"))
    assert isinstance(ext, TrainExtension)  # the lead's protocol
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n and "weight" in n}
    finetune(model, tiny_batches(2), FinetuneConfig(steps=4, lr=1e-2, warmup_steps=0), [ext])
    layers = compressed_layers(model)
    assert len(layers) == 12 and all(isinstance(m.compressor, QuantCompressor) for m in layers.values())
    query = model.base_model.model.bert.encoder.layer[0].attention.self.query
    assert isinstance(query.base_layer, CompressedLinear)  # LoRA wraps the quantized, frozen base
    for n, p in model.named_parameters():
        if n in base:
            assert not p.requires_grad and torch.equal(p, base[n])  # frozen
    lora_b = query.lora_B["default"].weight
    assert lora_b.abs().sum() > 0  # the full-precision adapter trained


def test_gradual_pruning_reaches_the_final_sparsity_off_the_update_grid(tiny_bert):
    """end_step 10 is not a multiple of every 4: the last update still happens at end_step."""
    model = tiny_bert()
    gmp = GradualPruning(PruningSchedule("unstructured:0.5", start_step=0, end_step=10, every=4))
    gmp.prepare(model)
    for step in range(12):
        gmp.update(step)
    assert gmp.current == 0.5 and gmp.sparsity() == pytest.approx(0.5, abs=1e-3)


def test_pruning_schedule_refuses_an_initial_sparsity_above_the_final():
    with pytest.raises(ValueError, match=r"initial_sparsity 0.5 must be in \[0, final 0.3\]"):
        PruningSchedule("unstructured:0.3", initial_sparsity=0.5)


def test_rigl_drop_fraction_decays_by_cosine_from_alpha_to_zero():
    ext = DynamicSparsity(DynamicSchedule("rigl", sparsity=0.5, drop_fraction=0.3, end_step=100))
    assert ext.drop_fraction(0) == pytest.approx(0.3)
    assert ext.drop_fraction(50) == pytest.approx(0.15)
    assert ext.drop_fraction(100) == pytest.approx(0.0, abs=1e-12) and ext.drop_fraction(200) == pytest.approx(0.0, abs=1e-12)


def test_rigl_keeps_the_gradient_of_the_step_before_each_update(tiny_bert):
    """every 3: updates at steps 3, 6, ...; the gradient kept is that of steps 2, 5, ..."""
    model = tiny_bert()
    ext = DynamicSparsity(DynamicSchedule("rigl", sparsity=0.5, every=3, end_step=100))
    ext.prepare(model)
    flags = []
    for step in range(6):
        ext._grads = {n: torch.zeros_like(m.weight) for n, m in compressed_layers(model).items()}
        ext.extra_loss(model, step)
        flags.append(ext._capture)
    ext.close()
    assert flags == [False, False, True, False, False, True]


def test_rigl_close_zeroes_the_pruned_latent_weights(tiny_bert, tiny_batches):
    model = tiny_bert()
    ext = DynamicSparsity(DynamicSchedule("rigl", sparsity=0.6, every=2, end_step=10))
    finetune(model, tiny_batches(2), FinetuneConfig(steps=4, lr=1e-2, warmup_steps=0), [ext])
    for layer in compressed_layers(model).values():  # the last optimizer step moved them (dense STE grads)
        assert torch.all(layer.weight[~layer.compressor.mask] == 0)


def test_compression_extension_hands_its_calibration_to_reconstruction(tiny_bert, tiny_batches):
    model = tiny_bert()
    ext = CompressionExtension(QuantConfig("int4:ch", reconstruct="gptq"), calibration=tiny_batches(2))
    ext.prepare(model)
    assert ext.report is not None and len(ext.report.layers) == 12


@pytest.mark.parametrize("make", [
    lambda: CompressionExtension(SparsityConfig("unstructured:0.5")),
    lambda: CompressionExtension(QuantConfig("int4")),
    lambda: CompressionExtension(QuantConfig("int4", freeze=False)),
    lambda: GradualPruning(PruningSchedule("unstructured:0.5", start_step=0, end_step=2, every=1)),
])
def test_a_compressed_full_fine_tuning_run_reloads_as_it_was_evaluated(make, tiny_setup, tmp_path):
    """train_glue saves the run after its evaluation: the compressed layers are put back as plain
    Linear layers holding the compressed weights, so load_run gives the evaluated model."""
    from tests.conftest import tiny_train_config

    from deftune.train import evaluate_glue, load_run, train_glue

    result = train_glue(tiny_train_config(tiny_setup, tmp_path, method="full", alpha=0.0), [make()], progress=False)
    model, tokenizer, cfg = load_run(tmp_path / "run")
    assert not compressed_layers(model)
    again = evaluate_glue(model, tokenizer, cfg)
    assert again.metrics == result.metrics and again.density.overall == result.density["exact"]
