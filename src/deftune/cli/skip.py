"""Remove MLP blocks from a trained run (ADA-DEFT): by learned gate, by measured density
(training-free) or keep-top-k; report the task metric before and after, and save the smaller
model (removed weights are not saved; reload it with deftune.ada.load_skipped).

Examples:
  deftune skip runs/sst2-ada --policy gate --tau 0.5
  deftune skip runs/sst2-deft --policy density --tau-density 0.05 --density-threshold 0.01
  deftune skip runs/sst2-ada --policy topk --keep 4 --score gate --latency-repeats 20
"""

from __future__ import annotations

import argparse
import json

from deftune.ada.config import SkipConfig
from deftune.ada.pipeline import SkipRunConfig
from deftune.cli._args import add_dataclass_arguments, dataclass_from_args

COMMAND = "skip"
HELP = "remove MLP blocks of a run by gate, density or top-k; report the metric before/after"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a finished deftune training run directory")
    add_dataclass_arguments(parser, SkipConfig, exclude=("stacks",))
    parser.add_argument(
        "--stacks", default="", help="comma-separated stacks to skip in (encoder,decoder); empty: all"
    )
    add_dataclass_arguments(parser, SkipRunConfig, exclude=("run_dir", "skip"))


def run(args: argparse.Namespace) -> int:
    from deftune.ada.pipeline import skip_run

    stacks = tuple(s for s in args.stacks.split(",") if s)
    skip = dataclass_from_args(SkipConfig, args, stacks=stacks)
    config = dataclass_from_args(SkipRunConfig, args, run_dir=args.run_dir, skip=skip)
    result = skip_run(config)
    summary = {
        "metric": result.metric,
        "before": round(result.before, 2),
        "after": round(result.after, 2),
        "delta": round(result.delta, 2),
        "skipped": f"{len(result.skipped)}/{len(result.blocks)} {result.skipped}",
        "param_bytes": f"{result.param_bytes_before} -> {result.param_bytes_after} "
        f"({100 * (result.param_bytes_after / result.param_bytes_before - 1):+.1f}%)",
        "latency_ms": {k: round(v, 2) for k, v in result.latency_ms.items()},
        "saved": result.output_dir,
    }
    print(json.dumps(summary, indent=2))
    return 0
