"""Calibrated thresholds: quantile accuracy on hand-made activations, the allocation modes, depth
refinement, padding, the target sweep and the CLI, on tiny BERT and tiny LLaMA built from configs
(the run-time wrappers and hooks: test_thresholds.py)."""

from __future__ import annotations

import json

import pytest
import torch
from sparse_tiny import batches, tiny_bert, tiny_llama

from deftune.arch import find_activation_sites
from deftune.density import ActivationRecorder, measure_density
from deftune.sparse.calibrate import (
    CalibrationConfig,
    MagnitudeHistogram,
    calibrate_thresholds,
    collect_histograms,
    sweep_targets,
)
from deftune.sparse.thresholds import ThresholdedActivation, Thresholds, thresholded

torch.set_num_threads(1)

# Tolerance on the calibration density: half the mass of one bin. For continuous data with
# 256 bins per octave (0.27 % relative width), a bin holds far less than this.
TOL = 2e-3
TARGETS = (1.0, 0.7, 0.5, 0.3, 0.1, 0.02)


# ---- hand-made activations -----------------------------------------------------------------


def exact_density(a: torch.Tensor, t: float) -> float:
    return int((a.abs() > t).sum()) / a.numel()


@pytest.mark.parametrize("dist", ["normal", "lognormal", "relu"])
@pytest.mark.parametrize("target", TARGETS)
def test_histogram_hits_target(dist, target):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40_000, generator=g)
    a = {"normal": x, "lognormal": torch.exp(3 * x), "relu": torch.relu(x)}[dist]
    hist = MagnitudeHistogram.empty(CalibrationConfig())
    hist.add("encoder.0", a[:25_000])
    hist.add("encoder.0", a[25_000:])  # streaming: two chunks
    th = hist.thresholds(target)
    t = th.values["encoder.0"]
    # the reported density is the exact count on the data, and near the target
    assert th.achieved["encoder.0"] == pytest.approx(exact_density(a, t), abs=1e-12)
    natural = int((a != 0).sum()) / a.numel()
    assert th.natural["encoder.0"] == pytest.approx(natural, abs=1e-12)
    assert th.achieved["encoder.0"] == pytest.approx(min(target, natural), abs=TOL)
    if target == 1.0:
        assert t == 0.0


def test_threshold_is_close_to_exact_quantile():
    a = torch.randn(100_000, generator=torch.Generator().manual_seed(2)).abs()
    hist = MagnitudeHistogram.empty(CalibrationConfig(bins_per_octave=256))
    hist.add("l", a)
    t = hist.thresholds(0.4).values["l"]
    exact = float(torch.quantile(a, 0.6))
    assert abs(t / exact - 1) < 2 ** (1 / 256) - 1  # within one bin


def test_global_mode_shares_one_threshold():
    g = torch.Generator().manual_seed(3)
    hist = MagnitudeHistogram.empty(CalibrationConfig())
    hist.add("encoder.0", torch.randn(20_000, generator=g))  # small activations
    hist.add("encoder.1", 10 * torch.randn(20_000, generator=g))  # large activations
    th = hist.thresholds(0.5, mode="global")
    assert th.values["encoder.0"] == th.values["encoder.1"]
    assert th.overall_achieved == pytest.approx(0.5, abs=TOL)
    assert th.achieved["encoder.0"] < 0.3 < 0.7 < th.achieved["encoder.1"]
    per_layer = hist.thresholds(0.5, mode="layer")
    assert per_layer.values["encoder.0"] < per_layer.values["encoder.1"]


def test_global_mode_weighs_layers_by_their_elements():
    """One shared threshold reaching the target over all *elements*: a layer with 4x the elements
    counts 4x (an unweighted mean of the layers' densities would put the threshold elsewhere)."""
    g = torch.Generator().manual_seed(4)
    small, large = torch.randn(10_000, generator=g), 10 * torch.randn(40_000, generator=g)
    hist = MagnitudeHistogram.empty(CalibrationConfig())
    hist.add("encoder.0", small)
    hist.add("encoder.1", large)
    th = hist.thresholds(0.5, mode="global")
    t = th.values["encoder.0"]
    pooled = float((torch.cat([small, large]).abs() > t).double().mean())
    assert pooled == pytest.approx(0.5, abs=TOL) and th.overall_achieved == pytest.approx(pooled, abs=TOL)
    unweighted = ((small.abs() > t).double().mean() + (large.abs() > t).double().mean()) / 2
    assert abs(float(unweighted) - 0.5) > 0.05  # the two readings differ here, so the test can tell them apart


def _removed_energy(a: torch.Tensor, t: float) -> float:
    a = a.double()
    return float((a[a.abs() <= t] ** 2).sum() / (a**2).sum())


def test_energy_below_matches_exact_sums():
    a = torch.randn(50_000, generator=torch.Generator().manual_seed(5))
    hist = MagnitudeHistogram.empty(CalibrationConfig())
    hist.add("l", a)
    energy = hist.energy_below("l")
    for k in (int(torch.searchsorted(hist.edges, q)) for q in (0.1, 0.5, 1.0, 2.0)):
        exact = _removed_energy(a, float(hist.edges[k]))
        assert energy[k].item() == pytest.approx(exact, rel=2 ** (2 / 256) - 1 + 1e-3)
    assert energy[0].item() == 0.0 and torch.all(energy[1:] >= energy[:-1])


def test_energy_mode_is_scale_free_and_equalises_removed_energy():
    g = torch.Generator().manual_seed(6)
    gauss = torch.randn(40_000, generator=g)
    heavy = torch.distributions.StudentT(2.0).sample((40_000,))  # most energy in a few large values
    layers = {"encoder.0": gauss, "encoder.1": 10 * gauss, "encoder.2": heavy}
    hist = MagnitudeHistogram.empty(CalibrationConfig())
    for name, a in layers.items():
        hist.add(name, a)
    th = hist.thresholds(0.5, mode="energy")
    assert th.mode == "energy"
    assert th.overall_achieved == pytest.approx(0.5, abs=TOL)
    # scale-free: a layer 10x larger gets a 10x threshold and the same density
    assert th.values["encoder.1"] == pytest.approx(10 * th.values["encoder.0"], rel=2 ** (1 / 256) - 1 + 1e-6)
    assert th.achieved["encoder.1"] == pytest.approx(th.achieved["encoder.0"], abs=TOL)
    # the same fraction of energy goes in every layer; the heavy-tailed layer gives up more values
    removed = [_removed_energy(a, th.values[n]) for n, a in layers.items()]
    assert max(removed) - min(removed) < 0.01
    assert th.achieved["encoder.2"] < th.achieved["encoder.0"] - 0.1


def test_energy_mode_on_tiny_llama_reaches_the_overall_target():
    model = tiny_llama()
    data = batches()
    th = calibrate_thresholds(model, data, CalibrationConfig(target=0.4, mode="energy", refine_passes=1))
    assert th.overall_achieved == pytest.approx(0.4, abs=0.02)  # few tokens: coarser than TOL
    with thresholded(model, th):  # 2 layers, 1 refinement pass: the calibration densities are exact
        density = measure_density(model, data)
    for name, value in density.exact_per_layer.items():
        assert value == pytest.approx(th.achieved[name], abs=1e-9), name


def test_histogram_merge_equals_single_pass():
    a = torch.randn(5_000, generator=torch.Generator().manual_seed(4))
    one, two, full = (MagnitudeHistogram.empty(CalibrationConfig()) for _ in range(3))
    one.add("l", a[:2_000])
    two.add("l", a[2_000:])
    full.add("l", a)
    one.merge(two)
    assert torch.equal(one.counts["l"], full.counts["l"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"target": 0.0}, "target"),
        ({"target": 1.5}, "target"),
        ({"mode": "median"}, "mode"),
        ({"bins_per_octave": 0}, "bins_per_octave"),
        ({"min_log2": 5, "max_log2": 2}, "min_log2"),
        ({"target": True}, "target"),  # a bool is not a density, nor a count
        ({"refine_passes": True}, "refine_passes"),
        ({"bins_per_octave": True}, "bins_per_octave"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CalibrationConfig(**kwargs)


# ---- tiny models ----------------------------------------------------------------------------


@pytest.mark.parametrize("build", [tiny_bert, tiny_llama], ids=["bert", "llama"])
def test_calibrated_model_reaches_target_and_restores(build):
    model = build()
    data = batches()
    with torch.no_grad():
        reference = [model(**b).logits for b in data]
    originals = {s.module_path: model.get_submodule(s.module_path) for s in find_activation_sites(model)}
    th = calibrate_thresholds(model, data, CalibrationConfig(target=0.4, refine_passes=1))
    assert set(th.values) == {s.name for s in find_activation_sites(model)}
    for name, achieved in th.achieved.items():
        assert achieved == pytest.approx(0.4, abs=0.02), name  # few tokens: coarser than TOL
    # applied on the same data, the measured exact density (real tokens) equals the calibration one:
    # with 2 layers and 1 refinement pass both layers are exact
    with thresholded(model, th):
        assert all(isinstance(model.get_submodule(p), ThresholdedActivation) for p in originals)
        density = measure_density(model, data)
        with torch.no_grad():
            changed = [model(**b).logits for b in data]
    for name, value in density.exact_per_layer.items():
        assert value == pytest.approx(th.achieved[name], abs=1e-9), name
    assert any(not torch.equal(r, c) for r, c in zip(reference, changed))
    # the context manager put back the very same modules; outputs are bit-identical again
    for path, module in originals.items():
        assert model.get_submodule(path) is module
    with torch.no_grad():
        assert all(torch.equal(model(**b).logits, r) for b, r in zip(data, reference))


def test_refinement_corrects_depth_drift():
    """Dense-model thresholds drift in later layers; each refinement pass fixes one more layer.

    MiniLM-shaped activations need depth to show the effect: a 4-layer tiny BERT at target 0.1.
    """
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(
        BertConfig(
            vocab_size=100,
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
        )
    ).eval()
    data = batches(n=4)

    def applied(th):
        with thresholded(model, th):
            return measure_density(model, data).exact_per_layer

    one_pass = calibrate_thresholds(model, data, CalibrationConfig(target=0.1, refine_passes=0))
    refined = calibrate_thresholds(model, data, CalibrationConfig(target=0.1, refine_passes=3))
    assert refined.refine_passes == 3
    drift_one = applied(one_pass)
    drift_refined = applied(refined)
    assert drift_one["encoder.0"] == pytest.approx(one_pass.achieved["encoder.0"], abs=1e-9)
    for name in refined.values:  # 3 passes after the first: all 4 layers exact
        assert drift_refined[name] == pytest.approx(refined.achieved[name], abs=1e-9), name
    worst_one = max(abs(v - 0.1) for v in drift_one.values())
    worst_refined = max(abs(v - 0.1) for v in drift_refined.values())
    assert worst_refined < worst_one


def test_histograms_of_a_thresholded_model_see_values_before_the_threshold():
    model = tiny_bert()
    data = batches(n=1)
    dense = collect_histograms(model, data)
    th = dense.thresholds(0.3)
    with thresholded(model, th):
        again = collect_histograms(model, data)
    # layer 0 has no thresholded layer before it: its histogram is unchanged (values before t)
    assert torch.equal(again.counts["encoder.0"], dense.counts["encoder.0"])
    assert not torch.equal(again.counts["encoder.1"], dense.counts["encoder.1"])


def test_padding_is_not_counted():
    """Activations at padding positions must not move the thresholds."""
    model = tiny_bert()
    data = batches(n=2)
    base = collect_histograms(model, data)
    garbage = [dict(b, input_ids=torch.where(b["attention_mask"] == 1, b["input_ids"], 99)) for b in data]
    assert all(torch.equal(base.counts[k], collect_histograms(model, garbage).counts[k]) for k in base.counts)
    padded = collect_histograms(model, garbage, CalibrationConfig(count_padding=True))
    assert any(not torch.equal(base.counts[k], padded.counts[k]) for k in base.counts)


def test_sweep_reports_metric_and_density():
    model = tiny_llama()
    data = batches(n=2)

    def evaluate(m):
        with torch.no_grad():
            return {"loss": sum(float(m(**b, labels=b["input_ids"]).loss) for b in data)}

    points = sweep_targets(model, data, [1.0, 0.2], evaluate, CalibrationConfig(refine_passes=1))
    assert [p.target for p in points] == [1.0, 0.2]
    assert points[0].eval_density == pytest.approx(points[0].calibration_density, abs=1e-9)
    # evaluated on the calibration data with 2 layers and 1 refinement pass: exact
    assert points[1].eval_density == pytest.approx(points[1].calibration_density, abs=1e-9)
    assert points[1].eval_density == pytest.approx(0.2, abs=0.02)
    assert points[1].metrics["loss"] != points[0].metrics["loss"]
    assert not any(isinstance(m, ThresholdedActivation) for m in model.modules())


# ---- command line ---------------------------------------------------------------------------


def test_cli_help_lists_every_option(capsys):
    from deftune.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["calibrate", "--help"])
    out = capsys.readouterr().out
    for option in ("--model", "--data", "--target", "--mode", "--site", "--sweep", "--refine-passes", "--output"):
        assert option in out


@pytest.mark.parametrize(
    "kwargs, match",
    [({"models": ()}, "--model"), ({"data": "wiki"}, "data"), ({"target": 0.0}, "target"),
     ({"labels": ("a", "b")}, "label"), ({"plot": "x.png"}, "--sweep"), ({"sweep": (2.0,)}, "target")],
)
def test_job_rejects_bad_values(kwargs, match):
    from deftune.calibration_study import CalibrationJob

    with pytest.raises(ValueError, match=match):
        CalibrationJob(**{"models": ("m",), **kwargs})


def _write_tiny_squad(path) -> None:
    """Four articles of three 30-word paragraphs (no questions): enough for calibration splits."""
    words = "the river flows past old stone towers where people gather in the evening".split()
    rng = torch.Generator().manual_seed(0)

    def paragraph():
        return " ".join(words[int(i)] for i in torch.randint(0, len(words), (30,), generator=rng))

    data = {"data": [{"title": f"a{i}", "paragraphs": [{"context": paragraph(), "qas": []} for _ in range(3)]}
                     for i in range(4)]}
    path.write_text(json.dumps(data))


@pytest.fixture
def tiny_lm_folder(tmp_path):
    """A tiny LLaMA saved with the packaged MiniLM tokenizer (no downloads), and a tiny SQuAD file."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from deftune import models

    try:
        tokenizer = models.load_tokenizer("minilm")
    except models.ModelNotFoundError as err:  # CI installs the package; a bare GPU box may not have it
        pytest.skip(str(err))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1))
    model.save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    _write_tiny_squad(tmp_path / "squad.json")
    return tmp_path


@pytest.mark.parametrize("site", ["act", "product"])
def test_cli_lm_sweep_writes_results_plot_and_thresholds(tiny_lm_folder, site):
    from deftune.cli import main

    tmp = tiny_lm_folder
    code = main(["calibrate", "--model", str(tmp / "lm"), "--label", "tiny", "--data", "squad", "--site", site,
                 "--squad-file", str(tmp / "squad.json"), "--sweep", "1,0.3", "--calib-size", "6",
                 "--eval-size", "6", "--batch-size", "4", "--max-length", "32", "--refine-passes", "1",
                 "--target", "0.3", "--output", str(tmp / "th.json"), "--name", "tiny-lm",
                 "--results", str(tmp / "res.json"), "--plot", str(tmp / "plot.png")])
    assert code == 0
    th = Thresholds.load(tmp / "th.json")
    assert th.target == 0.3 and th.refine_passes == 1 and len(th.values) == 2 and th.site == site
    record = json.loads((tmp / "res.json").read_text())["experiments"]["tiny-lm"]
    assert record["site"] == site
    points = record["models"]["tiny"]["points"]
    assert [p["target"] for p in points] == [1.0, 0.3]
    assert points[0]["metrics"]["perplexity"] > 1
    assert points[1]["eval_density"] < 0.6 < points[0]["eval_density"]  # measured at the thresholded site
    assert (tmp / "plot.png").stat().st_size > 1000


def test_squad_split_is_by_article(tmp_path):
    from deftune.calibration_study import squad_paragraphs

    _write_tiny_squad(tmp_path / "squad.json")
    data = json.loads((tmp_path / "squad.json").read_text())["data"]
    first = {p["context"] for a in data[:2] for p in a["paragraphs"]}
    calib = squad_paragraphs(tmp_path / "squad.json", "calib", 100)
    held_out = squad_paragraphs(tmp_path / "squad.json", "eval", 100)
    assert set(calib) == first and not set(held_out) & first




def test_a_histogram_from_another_site_or_binning_is_refused():
    model = tiny_llama()
    hist = collect_histograms(model, batches(n=1), CalibrationConfig(site="act"))
    with pytest.raises(ValueError, match="collected at site 'act', the config asks for site 'product'"):
        calibrate_thresholds(model, batches(n=1), CalibrationConfig(site="product"), histogram=hist)
    with pytest.raises(ValueError, match="bin edges differ"):
        calibrate_thresholds(model, batches(n=1), CalibrationConfig(bins_per_octave=8), histogram=hist)


def test_sweep_leaves_virtual_tokens_out():
    """A prompt-tuned model's leading positions are not tokens: skip_leading drops them everywhere."""
    from deftune.methods import MethodConfig, apply_method, virtual_token_count

    model = apply_method(tiny_bert(), MethodConfig("prompt", num_virtual_tokens=5)).eval()
    data = batches(n=1)
    skip = virtual_token_count(model)
    real = sum(int(b["attention_mask"].sum()) for b in data)
    hist = collect_histograms(model, data, CalibrationConfig(), skip_leading=skip)
    assert int(hist.counts[find_activation_sites(model)[0].name].sum()) == real * 64  # tokens x MLP width
    def evaluate(m):
        with torch.no_grad():
            m(**data[0])
        return {"none": 0.0}

    points = sweep_targets(model, data, [0.5], evaluate, CalibrationConfig(refine_passes=0), skip_leading=skip)
    assert points[0].eval_density == pytest.approx(0.5, abs=0.05)
    config = CalibrationConfig(refine_passes=0, target=0.5)
    real_only, with_virtual = (_sweep_density(model, data, config, evaluate, skip_leading=skip, measure_skip=n)
                               for n in (skip, 0))
    assert points[0].eval_density == pytest.approx(real_only, abs=1e-12)
    assert abs(real_only - with_virtual) > 1e-3  # the check can tell them apart


def _sweep_density(model, data, config, evaluate, *, skip_leading=0, measure_skip=None, count_padding=None):
    """The density a sweep point should report: its thresholds, ``evaluate`` under a recorder (which
    counts as ``measure_skip`` / ``count_padding`` say, by default as the calibration did)."""
    th = calibrate_thresholds(model, data, config, skip_leading=skip_leading)
    pad = config.count_padding if count_padding is None else count_padding
    skip = skip_leading if measure_skip is None else measure_skip
    with thresholded(model, th), ActivationRecorder(model, site=config.site, thresholds=(), count_padding=pad,
                                                    skip_leading=skip) as rec:
        evaluate(model)
        return rec.result().overall


def test_sweep_counts_padding_when_asked():
    model = tiny_bert().eval()
    data = batches(n=1)
    assert int(data[0]["attention_mask"].sum()) < data[0]["attention_mask"].numel()  # there is padding

    def evaluate(m):
        with torch.no_grad():
            m(**data[0])
        return {}

    config = CalibrationConfig(refine_passes=0, target=0.3, count_padding=True)
    points = sweep_targets(model, data, [0.3], evaluate, config)
    padded = _sweep_density(model, data, config, evaluate)
    assert points[0].eval_density == pytest.approx(padded, abs=1e-12)
    assert abs(padded - _sweep_density(model, data, config, evaluate, count_padding=False)) > 1e-3


# ---- the edge choice, on coarse bins where the two neighbouring edges are far apart -------------


def _coarse(values: dict[str, list[float]]) -> MagnitudeHistogram:
    hist = MagnitudeHistogram.empty(CalibrationConfig(bins_per_octave=1, min_log2=-4, max_log2=4))
    for name, v in values.items():
        hist.add(name, torch.tensor(v))
    return hist


@pytest.mark.parametrize("target, edge, achieved", [(0.55, 2.0, 0.5), (0.7, 1.0, 0.75), (0.625, 1.0, 0.75)])
def test_layer_mode_takes_the_nearer_edge_and_the_denser_one_on_a_tie(target, edge, achieved):
    """8 values: 2 in (0.5, 1], 2 in (1, 2], 4 in (2, 4]; density above edge 1 is 0.75, above 2 is
    0.5. Target 0.625 sits exactly between them (binary-exact): the denser edge wins."""
    th = _coarse({"encoder.0": [0.75, 0.75, 1.5, 1.5, 3.0, 3.0, 3.0, 3.0]}).thresholds(target)
    assert th.values["encoder.0"] == edge
    assert th.achieved["encoder.0"] == achieved


@pytest.mark.parametrize("target", [0.3, 0.45, 0.6, 0.75])
def test_energy_mode_picks_the_nearest_pooled_density_among_its_choices(target):
    """Against brute force: every removed-energy fraction ``f`` gives one choice per layer (its last
    edge with energy <= f); the mode must return the choice whose pooled density is nearest the
    target (ties: the denser), not merely one within a tolerance."""
    g = torch.Generator().manual_seed(11)
    layers = {
        "encoder.0": (torch.randn(300, generator=g)).tolist(),
        "encoder.1": (3 * torch.randn(500, generator=g) ** 3).tolist(),
    }
    hist = _coarse(layers)
    above = {n: hist.density_above(n) for n in layers}
    energy = {n: hist.energy_below(n) for n in layers}
    elements = {n: len(v) for n, v in layers.items()}
    total = sum(elements.values())
    candidates = sorted({0.0, *[float(x) for e in energy.values() for x in e]})
    best = None
    for f in candidates:
        ks = {n: max(int((e <= f).sum()) - 1, 0) for n, e in energy.items()}
        pooled = sum(float(above[n][k]) * elements[n] for n, k in ks.items()) / total
        key = (abs(pooled - target), -pooled)
        if best is None or key < best[0]:
            best = (key, pooled)
    th = hist.thresholds(target, mode="energy")
    assert th.overall_achieved == pytest.approx(best[1], abs=1e-12)


def test_energy_mode_breaks_a_tie_towards_the_denser_choice():
    """One layer of 256 values: densities are multiples of 1/256, so a target half-way between two
    neighbouring achievable densities is an exact tie (binary-exact), which the denser one wins."""
    hist = _coarse({"encoder.0": (torch.randn(256, generator=torch.Generator().manual_seed(12))).tolist()})
    above = hist.density_above("encoder.0")
    levels = sorted({float(x) for x in above if 0.2 < float(x) < 0.8})
    lo, hi = levels[len(levels) // 2 - 1], levels[len(levels) // 2]
    th = hist.thresholds((lo + hi) / 2, mode="energy")
    assert th.overall_achieved == hi


def test_refine_passes_leave_the_leading_positions_out_too():
    """skip_leading (prompt tuning's virtual tokens) holds for every pass, not the first only."""
    model = tiny_bert()
    data = batches()
    th = calibrate_thresholds(model, data, CalibrationConfig(target=0.5, refine_passes=1), skip_leading=2)
    assert th.refine_passes == 1
    first = collect_histograms(model, data, CalibrationConfig(), skip_leading=2)
    assert th.elements == {name: int(h.sum()) for name, h in first.counts.items()}


def test_a_target_of_one_needs_no_refine_pass():
    th = calibrate_thresholds(tiny_bert(), batches(), CalibrationConfig(target=1.0, refine_passes=2))
    assert th.refine_passes == 0 and all(t == 0.0 for t in th.values.values())


def test_merging_copies_counts_it_did_not_have():
    a = MagnitudeHistogram.empty(CalibrationConfig())
    b = MagnitudeHistogram.empty(CalibrationConfig())
    b.add("encoder.0", torch.tensor([1.0, 2.0]))
    before = b.counts["encoder.0"].clone()
    a.merge(b)
    a.add("encoder.0", torch.tensor([3.0]))
    assert torch.equal(b.counts["encoder.0"], before)


def test_collecting_histograms_gives_the_model_its_mode_back():
    model = tiny_bert().train()
    collect_histograms(model, batches(), CalibrationConfig())
    assert model.training


@pytest.mark.parametrize("value", [16.0, 12, 0, True])
def test_kernel_config_block_sizes_are_powers_of_two_by_name(value):
    from deftune.sparse.triton_mlp import KernelConfig

    with pytest.raises(ValueError, match=rf"KernelConfig.gate_block_i={value} must be a power of two"):
        KernelConfig(gate_block_i=value)


def test_squad_paragraphs_name_a_file_that_is_not_squad(tmp_path):
    from deftune.calibration_study import squad_paragraphs
    from deftune.data.glue import DataError

    (tmp_path / "x.json").write_text('{"data": [{"title": "t", "paras": []}]}')
    with pytest.raises(DataError, match="x.json: not a SQuAD v1.1 file.*paragraphs"):
        squad_paragraphs(tmp_path / "x.json", "eval", 3)
