"""Skipping MLP blocks: exactness against zeroed MLP outputs, plans, save/reload."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tests.conftest import randomise_affine

from deftune.ada import SkipConfig, SkipPlan, load_skipped, plan_skip, save_skipped, skip_mlps_
from deftune.ada.skip import PLAN_FILE, WEIGHTS_FILE, param_bytes, skipped_block_names
from deftune.ada.wrappers import down_proj_path, gate_path
from deftune.arch import find_activation_sites


def _zeroing_hooks(model, names):
    """Reference: run the unmodified model with the named MLP blocks' outputs zeroed."""
    handles = []
    for site in find_activation_sites(model):
        if site.name in names:
            module = model.get_submodule(down_proj_path(model, site))
            handles.append(module.register_forward_hook(lambda m, a, out: out * 0.0))
    return handles


def test_skipping_nothing_is_exact(case, logits):
    model = case.build().eval()
    inputs = case.inputs()
    before = logits(model, inputs)
    report = skip_mlps_(model, SkipPlan(skip=[]))
    assert report.skipped == [] and len(report.kept) == case.n_blocks
    assert report.param_bytes_saved == 0
    assert torch.equal(logits(model, inputs), before)


@pytest.mark.parametrize("which", [[0], [1, 2]])
def test_skipping_equals_zeroed_mlp_output(case, which, logits):
    model = randomise_affine(case.build().eval())  # a skipped block must keep its norm and biases right
    inputs = case.inputs()
    names = [find_activation_sites(model)[i].name for i in which]
    handles = _zeroing_hooks(model, names)
    try:
        expected = logits(model, inputs)
    finally:
        for h in handles:
            h.remove()
    dense = logits(model, inputs)
    assert not torch.allclose(expected, dense), "zeroing a block must change the output (test can fail)"

    report = skip_mlps_(model, SkipPlan(skip=names))
    torch.testing.assert_close(logits(model, inputs), expected, rtol=0, atol=1e-6)
    assert report.param_bytes_after < report.param_bytes_before
    assert skipped_block_names(model) == names
    remaining = [s.name for s in find_activation_sites(model)]
    assert all(n not in remaining for n in names)


def test_folded_gates_equal_scaled_outputs(case, logits):
    """Kept blocks' gates folded into the gate target == the block's contribution scaled by g."""
    model = randomise_affine(case.build().eval())  # the fold must scale the target's bias too
    inputs = case.inputs()
    sites = find_activation_sites(model)
    first, last = sites[0].name, sites[-1].name
    handles = _zeroing_hooks(model, [last])
    target = model.get_submodule(gate_path(model, sites[0]))
    handles.append(target.register_forward_hook(lambda m, a, out: out * 0.25))
    try:
        expected = logits(model, inputs)
    finally:
        for h in handles:
            h.remove()
    unscaled = logits(model, inputs)
    skip_mlps_(model, SkipPlan(skip=[last], scales={first: 0.25}))
    got = logits(model, inputs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, unscaled)


def test_gate_scales_the_contribution_behind_a_post_mlp_norm(gemma2_case, logits):
    """Gemma 2 adds ``norm(mlp(x))`` to the residual: a gate on the down projection would be cancelled
    by the norm, so the gate (hook and fold) must scale what the norm returns."""
    model = gemma2_case.build().eval()
    inputs = gemma2_case.inputs()
    site = find_activation_sites(model)[0]
    norm_path = site.mlp_path.rsplit(".", 1)[0] + ".post_feedforward_layernorm"
    assert gate_path(model, site) == norm_path
    seen = []
    handle = model.get_submodule(norm_path).register_forward_hook(lambda m, a, out: seen.append(out.clone()))
    try:
        logits(model, inputs)
        skip_mlps_(model, SkipPlan(skip=[], scales={site.name: 0.25}))
        logits(model, inputs)
    finally:
        handle.remove()
    dense, folded = seen
    assert dense.abs().max() > 0.1
    torch.testing.assert_close(folded, 0.25 * dense, rtol=1e-5, atol=1e-6)


def test_unsupported_family_leaves_the_model_unchanged():
    """A plan that cannot be applied (OPT has no skip rule) fails before any gate is folded."""
    from transformers import OPTConfig, OPTForCausalLM

    model = OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, ffn_dim=32,
                                     num_attention_heads=2, max_position_embeddings=32, word_embed_proj_dim=16))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = [s.name for s in find_activation_sites(model)]
    with pytest.raises(NotImplementedError, match="opt"):
        skip_mlps_(model, SkipPlan(skip=[names[0]], scales={names[1]: 0.5}))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_save_and_reload_without_removed_weights(case, tmp_path, logits):
    model = case.build().eval()
    inputs = case.inputs()
    sites = find_activation_sites(model)
    plan = SkipPlan(skip=[sites[1].name], scales={sites[0].name: 0.5}, blocks=[s.name for s in sites])
    removed_down = down_proj_path(model, sites[1]) + ".weight"
    kept_down = down_proj_path(model, sites[0]) + ".weight"
    skip_mlps_(model, plan)
    expected = logits(model, inputs)

    out = save_skipped(model, tmp_path / "skipped", plan)
    saved = load_file(str(out / WEIGHTS_FILE))
    assert removed_down not in saved and kept_down in saved
    assert sum(
        t.numel() * t.element_size() for k, t in saved.items() if k in dict(model.named_parameters())
    ) == (param_bytes(model))
    assert not (out / "model.safetensors").exists()
    assert json.loads((out / PLAN_FILE).read_text())["plan"]["skip"] == [sites[1].name]

    reloaded, plan2 = load_skipped(out)
    assert plan2.skip == plan.skip
    assert param_bytes(reloaded) == param_bytes(model)
    assert skipped_block_names(reloaded) == [sites[1].name]
    torch.testing.assert_close(logits(reloaded, inputs), expected, rtol=0, atol=0)


def test_an_incomplete_folder_is_refused_by_name(bert_case, tmp_path):
    """A weights file missing a tensor the plan keeps (or no plan at all) raises, naming the folder,
    instead of returning a model with meta tensors in it."""
    from safetensors.torch import save_file

    model = bert_case.build().eval()
    plan = SkipPlan(skip=["encoder.0"])
    skip_mlps_(model, plan)
    out = save_skipped(model, tmp_path / "s", plan)
    saved = load_file(str(out / WEIGHTS_FILE))
    kept_down = down_proj_path(model, find_activation_sites(model)[1]) + ".weight"
    del saved[kept_down]
    save_file(saved, str(out / WEIGHTS_FILE))
    with pytest.raises(RuntimeError, match=r"were not in weights.safetensors; the folder is incomplete") as err:
        load_skipped(out)
    assert kept_down in str(err.value) and str(out) in str(err.value)
    (out / PLAN_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="is .* a folder written by save_skipped"):
        load_skipped(out)


def test_reloaded_folder_is_refused_by_from_pretrained(bert_case, tmp_path):
    model = bert_case.build().eval()
    plan = SkipPlan(skip=["encoder.0"])
    skip_mlps_(model, plan)
    out = save_skipped(model, tmp_path / "s", plan)
    from transformers import BertForSequenceClassification

    with pytest.raises(OSError):
        BertForSequenceClassification.from_pretrained(out)


# ---- policies ----------------------------------------------------------------------------------


def test_policies_choose_the_expected_blocks(bert_case):
    model = bert_case.build()  # 3 blocks encoder.0..2
    gates = {"encoder.0": 0.9, "encoder.1": 0.05, "encoder.2": 0.4}
    density = {"encoder.0": 0.3, "encoder.1": 0.02, "encoder.2": 0.08}
    assert plan_skip(model, SkipConfig(policy="gate", tau=0.5), gates=gates).skip == [
        "encoder.1",
        "encoder.2",
    ]
    assert plan_skip(model, SkipConfig(policy="gate", tau=0.1), gates=gates).skip == ["encoder.1"]
    plan = plan_skip(model, SkipConfig(policy="density", tau_density=0.1), density=density)
    assert plan.skip == ["encoder.1", "encoder.2"] and plan.scales == {}
    plan = plan_skip(model, SkipConfig(policy="topk", keep=2, score="gate"), gates=gates)
    assert plan.skip == ["encoder.1"]
    assert plan.scales == {"encoder.0": 0.9, "encoder.2": 0.4}
    assert plan_skip(model, SkipConfig(policy="topk", keep=0, score="density"), density=density).skip == [
        "encoder.0",
        "encoder.1",
        "encoder.2",
    ]


def test_policy_boundaries_ties_and_stacks(bert_case, t5_case):
    """A gate (density) equal to tau is kept (the rule is a strict <); topk breaks a tie of scores
    by keeping the earlier block; ``stacks`` leaves the other stack's blocks alone."""
    model = bert_case.build()
    gates = {"encoder.0": 0.5, "encoder.1": 0.3, "encoder.2": 0.3}
    assert plan_skip(model, SkipConfig(policy="gate", tau=0.5), gates=gates).skip == ["encoder.1", "encoder.2"]
    density = {"encoder.0": 0.2, "encoder.1": 0.1, "encoder.2": 0.05}
    assert plan_skip(model, SkipConfig(policy="density", tau_density=0.1), density=density).skip == ["encoder.2"]
    plan = plan_skip(model, SkipConfig(policy="topk", keep=2, score="gate"), gates=gates)
    assert plan.skip == ["encoder.2"]  # encoder.1 and encoder.2 tie at 0.3: the earlier one stays
    t5 = t5_case.build()  # encoder.0-1, decoder.0-1
    scores = {"encoder.0": 0.1, "encoder.1": 0.9, "decoder.0": 0.2, "decoder.1": 0.1}
    only_decoder = SkipConfig(policy="gate", tau=0.5, stacks=("decoder",))
    plan = plan_skip(t5, only_decoder, gates=scores)
    assert plan.skip == ["decoder.0", "decoder.1"]
    assert plan.scales == {"encoder.0": 0.1, "encoder.1": 0.9}  # kept blocks still get their gates
    plan = plan_skip(t5, SkipConfig(policy="topk", keep=1, score="gate", stacks=("encoder",)), gates=scores)
    assert plan.skip == ["encoder.0"]  # keep counts within the eligible stack


def test_policy_errors_name_the_problem(bert_case):
    model = bert_case.build()
    with pytest.raises(ValueError, match="needs learned gates"):
        plan_skip(model, SkipConfig(policy="gate"))
    with pytest.raises(ValueError, match="no score for blocks"):
        plan_skip(model, SkipConfig(policy="gate"), gates={"encoder.0": 1.0})
    with pytest.raises(ValueError, match="unknown skip policy 'fast'"):
        SkipConfig(policy="fast")
    with pytest.raises(ValueError, match="keep must be an int"):
        SkipConfig(policy="topk", keep=-1)
    with pytest.raises(ValueError, match="not MLP blocks"):
        skip_mlps_(model, SkipPlan(skip=["decoder.7"]))


def test_density_policy_works_on_any_model_without_training(llama_case):
    from deftune.ada.skip import density_scores

    case = llama_case  # llama: SiLU, exact density ~1; thresholded density separates layers
    model = case.build().eval()
    scores = density_scores(model, [case.inputs()], threshold=1e-2)
    assert set(scores) == {"decoder.0", "decoder.1", "decoder.2"}
    assert all(0.0 <= v <= 1.0 for v in scores.values())
    low = min(scores, key=scores.get)
    tau = scores[low] + 1e-9
    plan = plan_skip(model, SkipConfig(policy="density", tau_density=min(tau, 1.0)), density=scores)
    assert low in plan.skip
