"""Compress a fine-tuned run's Linear layers (quantization or sparsity) and report the error.

Examples:
  deftune compress runs/compress_base --pattern int4:g128:asym --method gptq --pack
  deftune compress runs/compress_base --pattern nm:2:4
"""

from __future__ import annotations

import argparse

COMMAND = "compress"
HELP = "quantize or sparsify a fine-tuned run and report per-layer error, packed bytes and dev metric"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a fine-tuned run directory")
    parser.add_argument("--pattern", required=True, help="int<bits>[:tensor|ch|ch1|g<N>][:sym|asym][:mse|p<pct>] or "
                        "unstructured:<s> | threshold:<t> | nm:<n>:<m> | block:<r>x<c>:<s> | channel:<s>[:cols]")
    parser.add_argument("--method", default="rtn", choices=("rtn", "gptq", "mse"),
                        help="rtn (round to nearest), gptq (quantization) or mse (layer-wise refit)")
    from deftune.compress.sparsity import ALLOCATIONS

    parser.add_argument("--allocation", default="uniform", choices=ALLOCATIONS,
                        help="how a sparsity pattern's level is spread over layers (sparsity patterns only)")
    parser.add_argument("--pack", action="store_true", help="store quantized weights as real int4/int8 and count bytes")
    parser.add_argument("--no-eval", dest="evaluate", action="store_false",
                        help="skip the dev-set evaluation (which runs by default)")
    parser.add_argument("--calib-size", type=int, default=128, help="calibration sentences (0: none)")
    parser.add_argument("--data-dir", default=None, help="GLUE folder (default: the run's, or $DEFTUNE_DATA_DIR)")
    parser.add_argument("--output", default=None, help="write the report as JSON here")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")


def run(args: argparse.Namespace) -> int:
    from deftune.compress.run import CompressRunConfig, compress_run

    out = compress_run(CompressRunConfig(
        run_dir=args.run_dir, pattern=args.pattern, method=args.method, allocation=args.allocation, pack=args.pack,
        evaluate=args.evaluate, calib_size=args.calib_size, data_dir=args.data_dir, output=args.output,
        threads=args.threads,
    ))
    rep = out["report"]
    print(f"{rep['config']}: {len(rep['layers'])} layers, zero weights {rep['sparsity']:.1%}, "
          f"mean output error {rep['mean_output_rel_error'] if rep['mean_output_rel_error'] is not None else float('nan'):.4f}")
    if "metric_before" in out:
        print(f"dev metric {out['metric_before']:.2f} -> {out['metric_after']:.2f}")
    if "packed" in out:
        p = out["packed"]
        print(f"packed weights: {p['packed_bytes']:,} bytes vs {p['fp32_bytes']:,} fp32 ({p['ratio']:.3f}x); "
              f"max |logit diff| vs fake-quantized: {p['max_abs_logit_diff_vs_fake']:.2e}")
        if "metric_packed" in out:
            print(f"dev metric of the packed model: {out['metric_packed']:.2f}")
    return 0
