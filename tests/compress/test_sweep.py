"""The sweeps' bookkeeping on a tiny model: points checked before the first runs, saved as they
finish, keyed by their allocation; results JSON that strict parsers read."""

import json
import math
import threading
import time

import pytest

import deftune.compress.sweep as sweep
from deftune.compress.sweep import QuantSweepConfig, SparsitySweepConfig


@pytest.fixture
def tiny_data(monkeypatch, tiny_bert, tiny_batches):
    """``load_sweep_data`` replaced by a tiny BERT (MLP 64, hidden 32) and random batches."""
    from deftune.data.glue import get_task

    batches = tiny_batches(n_batches=2)
    data = sweep.SweepData(model=tiny_bert(), task=get_task("sst2"), dev=batches,
                           calibration=[{k: v for k, v in b.items() if k != "labels"} for b in batches],
                           train=[], run_dir="runs/tiny")
    monkeypatch.setattr(sweep, "load_sweep_data", lambda *a, **k: data)
    return data


def _points(path, section):
    return json.loads(path.read_text())[section]["points"]


def test_a_pattern_that_does_not_fit_the_allocation_is_refused_by_the_config():
    with pytest.raises(ValueError, match="'erk' allocation needs a fraction-based pattern.*nm:2:4"):
        SparsitySweepConfig(levels=(0.5,), patterns=("unstructured", "nm:2:4"), methods=("oneshot",), allocation="erk")
    with pytest.raises(ValueError, match="global allocation.*block"):
        SparsitySweepConfig(levels=(0.5,), patterns=("unstructured", "block:4x4"), methods=("oneshot",),
                            allocation="global")


def test_a_granularity_that_fits_no_layer_fails_before_the_first_point(tiny_data, tmp_path):
    out = tmp_path / "r.json"
    config = QuantSweepConfig(run_dir="runs/tiny", bits=(8,), granularities=("ch", "g48"), methods=("rtn",),
                              output=str(out), plot=None, pack=False)
    with pytest.raises(ValueError, match=r"g48|group.*48"):
        sweep.quant_sweep(config)
    assert not out.exists()  # nothing ran: no half-written section either


def test_points_are_saved_as_they_finish(tiny_data, tmp_path, monkeypatch):
    """A sweep that fails at its second point keeps its first in the results file."""
    out = tmp_path / "r.json"
    calls, oneshot = [], sweep.SPARSITY_RUNNERS["oneshot"]

    def flaky(model, pattern, data, cfg):
        calls.append(str(pattern))
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return oneshot(model, pattern, data, cfg)

    monkeypatch.setitem(sweep.SPARSITY_RUNNERS, "oneshot", flaky)
    config = SparsitySweepConfig(run_dir="runs/tiny", levels=(0.3, 0.5), patterns=("unstructured",),
                                 methods=("oneshot",), output=str(out), plot=None)
    with pytest.raises(RuntimeError, match="out of memory"):
        sweep.sparsity_sweep(config)
    assert [p["pattern"] for p in _points(out, "sparsity")] == ["unstructured:0.3"]
    assert json.loads(out.read_text())["sparsity"]["invocations"] == []  # the invocation did not finish


def test_points_of_another_allocation_are_kept_apart(tiny_data, tmp_path):
    out = tmp_path / "r.json"
    for allocation in ("uniform", "erk", "uniform"):
        sweep.sparsity_sweep(SparsitySweepConfig(run_dir="runs/tiny", levels=(0.5,), patterns=("unstructured",),
                                                 methods=("oneshot",), allocation=allocation, output=str(out),
                                                 plot=None))
    points = _points(out, "sparsity")
    assert sorted(p["allocation"] for p in points) == ["erk", "uniform"]
    by = {p["allocation"]: p for p in points}
    assert by["erk"]["sparsity"] == pytest.approx(0.5, abs=0.01) and by["uniform"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    invocations = json.loads(out.read_text())["sparsity"]["invocations"]
    assert [i["config"]["allocation"] for i in invocations] == ["uniform", "erk", "uniform"]


def test_a_layer_reproduced_exactly_leaves_the_results_strict_json():
    from deftune.compress.model import CompressReport, LayerReport
    from deftune.compress.patterns import parse_quant

    def layer(sqnr):
        return LayerReport("l", (4, 4), "int8:ch0", 0.0, sqnr, None, 0.0, 64)

    pattern = parse_quant("int8")
    point = sweep.quant_point(pattern, "rtn", 80.0, 80.0, CompressReport("x", [layer(math.inf), layer(30.0)]))
    assert (point["mean_weight_sqnr_db"], point["exact_layers"], point["layers"]) == (30.0, 1, 2)
    point = sweep.quant_point(pattern, "rtn", 80.0, 80.0, CompressReport("x", [layer(math.inf)]))
    assert point["mean_weight_sqnr_db"] is None
    json.dumps(point, allow_nan=False)


def test_concurrent_merges_into_one_file_lose_nothing(tmp_path, monkeypatch):
    """The quantization and the sparsity sweep writing the same file at once: read-merge-write is
    locked, so neither section is lost (without the lock both threads read the empty file)."""
    import deftune.runs as runs
    from deftune.compress.results import merge_results

    read = runs.read_json

    def slow_read(path):
        data = read(path)
        time.sleep(0.2)
        return data

    monkeypatch.setattr(runs, "read_json", slow_read)
    path = tmp_path / "compression.json"
    path.write_text("{}")
    section = {"run_dir": "r", "invocations": [], "points": [{"pattern": "p", "method": "m"}]}
    threads = [threading.Thread(target=merge_results, args=(str(path), name, section, ("pattern", "method")))
               for name in ("quant", "sparsity")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(json.loads(path.read_text())) == {"quant", "sparsity"}
