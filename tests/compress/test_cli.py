import pytest

from deftune.cli import build_parser, main


@pytest.mark.parametrize(
    "argv",
    [["sweep", "--help"], ["sweep", "quant", "--help"], ["sweep", "sparsity", "--help"], ["compress", "--help"]],
)
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)
    assert exit_info.value.code == 0
    assert "usage" in capsys.readouterr().out


def test_sweep_arguments_parse():
    args = build_parser().parse_args(
        ["sweep", "sparsity", "--levels", "0.5,0.7", "--pattern", "unstructured", "--pattern", "nm:2:4",
         "--methods", "oneshot,recovery", "--steps", "10"]
    )
    assert args.levels == (0.5, 0.7) and args.patterns == ["unstructured", "nm:2:4"] and args.steps == 10
    args = build_parser().parse_args(["sweep", "quant", "--bits", "4,8", "--granularities", "g128", "--asym"])
    assert args.bits == (4, 8) and args.granularities == ("g128",) and args.asym


def test_bad_values_give_one_line_errors(capsys, tmp_path):
    assert main(["sweep", "quant", "--bits", "9", "--run-dir", str(tmp_path)]) == 2
    assert "bits" in capsys.readouterr().err
    assert main(["sweep", "sparsity", "--methods", "magic", "--run-dir", str(tmp_path)]) == 2
    assert "magic" in capsys.readouterr().err
    assert main(["compress", str(tmp_path), "--pattern", "nm:2:4", "--pack"]) == 2
    assert "quantization pattern" in capsys.readouterr().err
    assert main(["compress", str(tmp_path), "--pattern", "int4:g128", "--allocation", "erk"]) == 2
    assert "--allocation erk" in capsys.readouterr().err


@pytest.mark.parametrize("field, value", [("method", "magic"), ("allocation", "even"), ("calib_size", -1),
                                          ("threads", 0), ("threads", True)])
def test_compress_run_config_refuses_bad_values(field, value):
    from deftune.compress.run import CompressRunConfig

    with pytest.raises(ValueError, match=field):
        CompressRunConfig(run_dir="runs/x", pattern="int8", **{field: value})


def test_sparsity_sweep_points():
    from deftune.compress.sweep import SparsitySweepConfig, expand_pattern

    assert str(expand_pattern("block:4x4", 0.5)) == "block:4x4:0.5"
    assert str(expand_pattern("channel:cols", 0.3)) == "channel:0.3:cols"
    assert str(expand_pattern("nm:2:4", 0.9)) == "nm:2:4"
    cfg = SparsitySweepConfig(levels=(0.3, 0.5), patterns=("unstructured", "nm:2:4"),
                              methods=("oneshot", "recovery", "gmp"), train_levels=(0.5,))
    pts = [(str(p), m) for p, m in cfg.points()]
    assert ("unstructured:0.3", "oneshot") in pts and ("unstructured:0.3", "recovery") not in pts
    assert ("unstructured:0.5", "gmp") in pts and ("nm:2:4", "recovery") in pts and ("nm:2:4", "gmp") not in pts


def make_section(points, run_dir="runs/x", cmd="deftune sweep quant"):
    return {"run_dir": run_dir, "task": "sst2", "metric_name": "accuracy", "baseline": 86.0, "dev_examples": 872,
            "hardware": "cpu", "invocations": [{"command": cmd}], "points": points}


def _qpoint(bits, method, metric):
    return {"pattern": f"int{bits}:ch0:sym", "method": method, "bits": bits, "granularity": "ch0", "metric": metric,
            "delta": metric - 86.0, "mean_output_rel_error": 0.1, "packed": {"ratio": 0.13}, "seconds": 1.0}


def test_results_merge_plot_and_table(tmp_path):
    from deftune.compress.results import markdown_table, merge_results, plot_quant

    path = tmp_path / "r.json"
    merge_results(str(path), "quant", make_section([_qpoint(4, "rtn", 85.0), _qpoint(8, "rtn", 86.0)]), key=("pattern", "method"))
    merged = merge_results(str(path), "quant", make_section([_qpoint(4, "rtn", 84.0), _qpoint(4, "gptq", 85.5)], cmd="second"),
                    key=("pattern", "method"))["quant"]
    got = {(p["pattern"], p["method"]): p["metric"] for p in merged["points"]}
    assert got == {("int4:ch0:sym", "rtn"): 84.0, ("int8:ch0:sym", "rtn"): 86.0, ("int4:ch0:sym", "gptq"): 85.5}
    assert [i["command"] for i in merged["invocations"]] == ["deftune sweep quant", "second"]
    table = markdown_table(merged)
    assert "| `int4:ch0:sym` | gptq | 85.50 | -0.50 |" in table
    plot_quant(merged, str(tmp_path / "q.png"))
    assert (tmp_path / "q.png").read_bytes()[:4] == b"\x89PNG"
    other = merge_results(str(path), "quant", make_section([_qpoint(2, "rtn", 50.0)], run_dir="runs/other"), key=("pattern", "method"))
    assert len(other["quant"]["points"]) == 1  # another run replaces the section


def test_quant_sweep_patterns_carry_their_suffixes():
    from deftune.compress.sweep import QuantSweepConfig

    assert QuantSweepConfig(bits=(4,), granularities=("ch",), asym=True).patterns() == ["int4:ch:asym"]
    assert QuantSweepConfig(bits=(4, 8), granularities=("g128",), clip="mse").patterns() == ["int4:g128:mse",
                                                                                           "int8:g128:mse"]


def test_rigl_runs_on_unstructured_patterns_only():
    from deftune.compress.sweep import SparsitySweepConfig

    cfg = SparsitySweepConfig(levels=(0.5,), patterns=("unstructured", "block:4x4"), methods=("rigl", "gmp"),
                              train_levels=(0.5,))
    pts = [(str(p), m) for p, m in cfg.points()]
    assert pts == [("unstructured:0.5", "rigl"), ("unstructured:0.5", "gmp"), ("block:4x4:0.5", "gmp")]


def test_tables_show_measured_sparsity_and_packed_ratio():
    from deftune.compress.results import markdown_table

    quant = markdown_table(make_section([_qpoint(4, "rtn", 85.0)]))
    assert "| `int4:ch0:sym` | rtn | 85.00 | -1.00 | 0.1000 | 0.130 | 1 |" in quant
    sparse_point = {"pattern": "unstructured:0.5", "method": "oneshot", "level": 0.5, "sparsity": 0.4987,
                    "metric": 80.0, "delta": -6.0, "mean_output_rel_error": 0.2, "seconds": 2.0}
    sparse = markdown_table(make_section([sparse_point]))
    assert "| `unstructured:0.5` | oneshot | 80.00 | -6.00 | 0.499 | 0.2000 | 2 |" in sparse


def test_a_quant_point_averages_the_layers_weight_sqnr():
    from deftune.compress.model import CompressReport, LayerReport
    from deftune.compress.patterns import parse_quant
    from deftune.compress.sweep import quant_point

    def layer(sqnr, out):
        return LayerReport("l", (4, 4), "int4:g128", 0.1, sqnr, out, 0.0, 64)

    report = CompressReport("int4:g128", [layer(10.0, 0.2), layer(20.0, None), layer(40.0, 0.4)])
    point = quant_point(parse_quant("int4:g128"), "gptq", 84.0, 86.5, report)
    assert point["mean_weight_sqnr_db"] == pytest.approx(70 / 3)
    assert point["mean_output_rel_error"] == pytest.approx(0.3)  # layers without an output error left out
    assert (point["bits"], point["granularity"], point["delta"], point["layers"]) == (4, "g128", -2.5, 3)
