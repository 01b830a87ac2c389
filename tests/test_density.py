"""Density recorder: hand-computed values, masking, hook removal, serialisation."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from deftune.arch import ActivationSite, ArchSpec, SitePattern, register_architecture
from deftune.density import ActivationRecorder, DensityResult, align_mask, measure_density, stack_masks

register_architecture(
    ArchSpec(family="toy-density", model_types=("toy-density",),
             act=SitePattern(r"(?P<mlp>layers\.(?P<layer>\d+))\.act$"), down_proj="down"),
    overwrite=True,
)


class Toy(nn.Module):
    """Two 'layers' whose activation module is the identity: activations equal the input."""

    def __init__(self):
        super().__init__()
        self.config = type("C", (), {"model_type": "toy-density", "is_encoder_decoder": False})()
        self.layers = nn.ModuleList([nn.ModuleDict({"act": nn.Identity()}) for _ in range(2)])
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x, attention_mask=None, fail=False):
        for layer in self.layers:
            x = layer["act"](x * self.scale)
        if fail:
            raise RuntimeError("boom")
        return x


# (B=1, T=3, F=4); the third token is padding
A = torch.tensor([[[0.0, 1e-4, 0.5, -2.0], [0.0, 0.0, 0.02, 3.0], [9.0, 9.0, 9.0, 9.0]]])
MASK = torch.tensor([[1, 1, 0]])


def test_hand_computed_density_real_tokens():
    model = Toy()
    with ActivationRecorder(model, thresholds=(1e-3, 1e-1)) as rec:
        model(A, attention_mask=MASK)
    r = rec.result()
    layer = r.per_layer["encoder.0"]
    # real tokens: 8 values; non-zero: 1e-4, .5, -2, .02, 3 -> 5/8
    assert layer.exact == pytest.approx(5 / 8)
    assert layer.positive == pytest.approx(4 / 8)
    assert layer.thresholded["0.001"] == pytest.approx(4 / 8)
    assert layer.thresholded["0.1"] == pytest.approx(3 / 8)
    assert layer.tokens == 2 and layer.features == 4
    assert r.overall == pytest.approx(5 / 8) and r.per_stack == {"encoder": pytest.approx(5 / 8)}


def test_all_reduce_in_a_one_process_group_keeps_every_count(tmp_path):
    """all_reduce packs each layer's counts into a row and unpacks the sum: with one process the sum is
    the counts themselves, so any mix-up of the packed order (nonzero / positive / above) shows."""
    import dataclasses

    import torch.distributed as dist

    from deftune.density import SiteCounts

    model = Toy()
    with ActivationRecorder(model, thresholds=(1e-3, 1e-1)) as rec:
        model(A, attention_mask=MASK)
    assert len(rec.counts) >= 2
    # every field of every layer distinct, so a swap of fields or of layers cannot cancel out
    for i, name in enumerate(rec.counts):
        rec.counts[name] = SiteCounts(elements=1000 + i, tokens=100 + i, nonzero=700 + i, positive=400 + i,
                                      above=[300 + i, 200 + i])
    before = {name: dataclasses.asdict(c) for name, c in rec.counts.items()}
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        rec.all_reduce()
    finally:
        dist.destroy_process_group()
    assert {name: dataclasses.asdict(c) for name, c in rec.counts.items()} == before


def test_a_positional_attention_mask_counts_real_tokens_too():
    """``model(input_ids, attention_mask)`` (how BERT's forward orders them) masks like the keyword."""
    model = Toy()
    with ActivationRecorder(model) as rec:
        model(A, MASK)
    layer = rec.result().per_layer["encoder.0"]
    assert layer.tokens == 2 and layer.exact == pytest.approx(5 / 8)


def test_count_padding_matches_official_convention():
    model = Toy()
    with ActivationRecorder(model, count_padding=True) as rec:
        model(A, attention_mask=MASK)
    assert rec.result().overall == pytest.approx(9 / 12)


def test_streaming_accumulates_over_batches():
    model = Toy()
    with ActivationRecorder(model) as rec:
        model(A, attention_mask=MASK)
        model(torch.zeros(1, 2, 4), attention_mask=torch.ones(1, 2))
    assert rec.result().overall == pytest.approx(5 / 16)


def test_hooks_removed_after_exception():
    model = Toy()
    with pytest.raises(RuntimeError, match="boom"):
        with ActivationRecorder(model):
            model(A, attention_mask=MASK, fail=True)
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_loss_is_masked_mean_and_differentiable():
    model = Toy()
    fn = lambda a: a.abs()  # noqa: E731
    with ActivationRecorder(model, loss_fn=fn, track_stats=False) as rec:
        model(A, attention_mask=MASK)
    losses = rec.pop_losses()
    expected = (1e-4 + 0.5 + 2.0 + 0.02 + 3.0) / 8
    assert losses["encoder.0"].item() == pytest.approx(expected, rel=1e-5)
    losses["encoder.1"].backward()
    assert model.scale.grad is not None and model.scale.grad.abs() > 0
    assert rec.pop_losses() == {}


def test_no_loss_under_no_grad():
    model = Toy()
    with ActivationRecorder(model, loss_fn=torch.abs) as rec, torch.no_grad():
        model(A, attention_mask=MASK)
    assert rec.losses == {}


def test_align_mask_right_aligns_and_flattens():
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 0]])
    a = torch.zeros(2, 1, 5)  # one decoding step with a cache
    assert align_mask(mask, a).tolist() == [[True], [False]]
    flat = torch.zeros(8, 5)  # OPT flattens (B*T, F)
    assert align_mask(mask, flat).tolist() == [False, True, True, True, True, True, True, False]
    assert align_mask(mask, torch.zeros(2, 5)).tolist() == [True, False]  # OPT, one cached decoding step
    assert align_mask(mask, torch.zeros(3, 9, 5)) is None


def test_stack_masks_of_encoder_decoder_calls():
    enc = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    token_labels = torch.tensor([[5, 6, -100], [7, -100, -100]])
    assert stack_masks({"attention_mask": enc}, False) == {"encoder": enc, "decoder": enc}
    assert stack_masks({"attention_mask": enc, "labels": token_labels}, True)["decoder"].tolist() == [
        [True, True, False], [True, False, False]]
    dec = torch.tensor([[1, 0, 0], [1, 1, 0]])
    assert stack_masks({"attention_mask": enc, "decoder_attention_mask": dec, "labels": token_labels},
                       True)["decoder"] is dec
    # T5's classification head: class labels (B,), the decoder reads input_ids shifted right
    shifted = stack_masks({"attention_mask": enc, "labels": torch.tensor([0, 1])}, True)["decoder"]
    assert shifted.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    # decoder inputs given without their mask: unknown
    assert stack_masks({"attention_mask": enc, "decoder_input_ids": dec}, True)["decoder"] is None


def test_skip_leading_excludes_virtual_tokens():
    model = Toy()
    with ActivationRecorder(model, skip_leading=1) as rec:
        model(A, attention_mask=MASK)
    # only the second token counts: 0, 0, .02, 3 -> 2/4
    assert rec.result().overall == pytest.approx(0.5)


def test_set_masks_covers_a_decoder_only_stack():
    """Decoder-only sites are the "decoder" stack: ``set_masks(attention_mask)`` must mask them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    act = model.model.layers[0].mlp.act_fn
    with ActivationRecorder(model) as rec, torch.no_grad():
        rec.set_masks(torch.tensor([[1, 1, 1, 0, 0]]))
        act(torch.randn(1, 5, 24))  # a call that bypasses the model's forward
    assert rec.counts["decoder.0"].tokens == 3


def test_skip_leading_is_per_stack_and_follows_flattened_layouts():
    """Virtual tokens lead the encoder input only; OPT's (B*T, F) activations lose them as well."""
    from transformers import OPTConfig, OPTForCausalLM, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=32, d_model=16, d_kv=8, d_ff=24, num_layers=1,
                                             num_decoder_layers=1, num_heads=2, decoder_start_token_id=0)).eval()
    ids = torch.randint(2, 32, (2, 6))
    labels = torch.randint(2, 32, (2, 4))
    for skip, expected in ((0, {"encoder.0": 12, "decoder.0": 8}), (2, {"encoder.0": 8, "decoder.0": 8})):
        with ActivationRecorder(t5, skip_leading=skip) as rec, torch.no_grad():
            t5(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
        assert {k: c.tokens for k, c in rec.counts.items()} == expected
    opt = OPTForCausalLM(OPTConfig(vocab_size=32, hidden_size=16, ffn_dim=24, num_hidden_layers=1, num_attention_heads=2,
                                   max_position_embeddings=32, word_embed_proj_dim=16)).eval()
    for skip, expected in ((0, 12), (2, 8)):
        with ActivationRecorder(opt, skip_leading=skip) as rec, torch.no_grad():
            opt(input_ids=ids, attention_mask=torch.ones_like(ids))
        assert rec.counts["decoder.0"].tokens == expected


def test_result_json_roundtrip_and_table():
    model = Toy()
    with ActivationRecorder(model) as rec:
        model(A, attention_mask=MASK)
    r = rec.result()
    again = DensityResult.from_dict(json.loads(r.to_json()))
    assert again == r
    table = r.table()
    assert "encoder.0" in table and "overall" in table


def test_empty_recording_raises():
    with ActivationRecorder(Toy()) as rec:
        pass
    with pytest.raises(RuntimeError, match="no activations"):
        rec.result()


def test_bad_thresholds():
    with pytest.raises(ValueError, match="thresholds"):
        ActivationRecorder(Toy(), thresholds=(-1.0,))


def test_measure_density_on_bert_counts_real_tokens_only(bert):
    from tests.conftest import batch

    b = batch()
    r_real = measure_density(bert, [b])
    r_all = measure_density(bert, [b], count_padding=True)
    layer = r_real.per_layer["encoder.0"]
    assert layer.tokens == int(b["attention_mask"].sum()) and r_all.per_layer["encoder.0"].tokens == b["input_ids"].numel()
    assert 0 < r_real.overall <= 1 and r_real.dtype == "float32"
    assert not bert.training


def test_save_reload_same_density(bert, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from tests.conftest import batch, tiny_bert

    model = get_peft_model(bert, LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value", "intermediate.dense"], init_lora_weights=False))
    before = measure_density(model, [batch()])
    model.save_pretrained(tmp_path)
    again = PeftModel.from_pretrained(tiny_bert(), tmp_path)
    assert measure_density(again, [batch()]) == before


def test_thresholded_overall_weighs_layers_by_their_elements():
    from deftune.density import DensityResult, LayerDensity, _tau_key

    key = _tau_key(0.01)
    layers = {"encoder.0": LayerDensity("encoder", 1.0, 0.5, {key: 0.2}, tokens=10, features=4),  # 40 elements
              "encoder.1": LayerDensity("encoder", 1.0, 0.5, {key: 0.8}, tokens=10, features=16)}  # 160 elements
    result = DensityResult(layers, {"encoder": 1.0}, 1.0, (0.01,), False, "float32", "act")
    assert result.thresholded_overall(0.01) == pytest.approx((0.2 * 40 + 0.8 * 160) / 200)  # 0.68, not 0.5


def test_thresholded_counts_are_strictly_above_tau():
    from deftune.density import SiteCounts

    c = SiteCounts()
    c.add(torch.tensor([[0.5, -0.5, 0.25, 1.0]]), None, [0.5])
    assert c.above == [1] and c.nonzero == 4


def test_align_mask_for_flat_activations_keeps_batch_major_order():
    assert align_mask(torch.tensor([1, 0, 1, 1]), torch.zeros(4, 5)).tolist() == [True, False, True, True]
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])  # asymmetric: a transposed reading differs
    assert align_mask(mask, torch.zeros(6, 5)).tolist() == [True, True, False, True, False, False]


def test_leading_positions_of_a_flat_activation_follow_batch_major_order():
    model = Toy()
    rec = ActivationRecorder(model, skip_leading=1)
    rec.set_masks(torch.ones(2, 3))
    assert rec._after_leading(torch.zeros(6, 4)).tolist() == [False, True, True, False, True, True]


def test_overall_density_weighs_stacks_by_their_elements():
    from deftune.density import SiteCounts

    sites = [ActivationSite("encoder.0", "encoder", 0, "layers.0.act", "output", "layers.0"),
             ActivationSite("decoder.0", "decoder", 0, "layers.1.act", "output", "layers.1")]
    rec = ActivationRecorder(Toy(), sites, thresholds=())
    rec.counts = {"encoder.0": SiteCounts(elements=100, tokens=10, nonzero=10, positive=10),
                  "decoder.0": SiteCounts(elements=10, tokens=1, nonzero=10, positive=10)}
    result = rec.result()
    assert result.per_stack == {"encoder": 0.1, "decoder": 1.0}
    assert result.overall == pytest.approx(20 / 110)


def test_a_threshold_of_zero_reads_the_exact_density():
    model = Toy()
    with ActivationRecorder(model, thresholds=(0.0,)) as rec:
        model(A, attention_mask=MASK)
    layer = rec.result().per_layer["encoder.0"]
    assert layer.thresholded["0"] == layer.exact


def _tiny_llama(seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, num_attention_heads=4, num_key_value_heads=4, intermediate_size=64, num_hidden_layers=2,
        vocab_size=100)).train()


def _checkpointed_step(checkpointing):
    from deftune import DensityLossConfig, DensityRegularizer

    model = _tiny_llama()
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    ids = torch.randint(2, 100, (2, 6), generator=torch.Generator().manual_seed(1))
    reg = DensityRegularizer(model, DensityLossConfig(alpha=1.0))
    with reg:
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
        loss, _ = reg.total_loss(out.loss, 0)
        loss.backward()
        tokens = {n: c.tokens for n, c in reg.recorder.counts.items()}
        left = dict(reg.recorder.losses)
    return tokens, left, [p.grad for p in model.parameters()]


def test_gradient_checkpointing_neither_double_counts_nor_changes_the_gradient():
    """Non-re-entrant checkpointing re-runs each block's forward inside backward: that pass is not
    counted again and leaves no loss graph behind; the gradients are those of a plain run."""
    tokens, left, grads = _checkpointed_step(None)
    ck_tokens, ck_left, ck_grads = _checkpointed_step({"use_reentrant": False})
    assert ck_tokens == tokens == {"decoder.0": 12, "decoder.1": 12} and ck_left == left == {}
    for g, ck in zip(grads, ck_grads):
        torch.testing.assert_close(ck, g)


def test_reentrant_checkpointing_names_the_fix():
    with pytest.raises(RuntimeError, match="use_reentrant': False"):
        _checkpointed_step({"use_reentrant": True})


def test_feed_forward_chunking_is_refused_by_name(bert):
    for module in bert.modules():
        if hasattr(module, "chunk_size_feed_forward"):
            module.chunk_size_feed_forward = 2
    with pytest.raises(ValueError, match="chunk_size_feed_forward"):
        ActivationRecorder(bert).attach()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in bert.modules())
