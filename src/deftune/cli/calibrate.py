"""Calibrate per-layer activation thresholds (|a| <= t_l -> 0) to a target density, and optionally
measure the task metric against the target density (a sweep).

Data (``--data``):
  sst2   calibrate on SST-2 train sentences; the metric is accuracy on the SST-2 dev set (needs a run
         directory with a trained head, e.g. runs/demo/deft).
  squad  calibrate on SQuAD v1.1 dev paragraphs of the first 24 articles; the metric is perplexity of
         a causal LM on paragraphs of the other 24 articles (split by article, never by question).

Examples:
  deftune calibrate --model runs/demo/deft --data sst2 --target 0.3 --output thresholds.json
  deftune calibrate --model runs/demo/peft --model runs/demo/deft --label peft --label deft \\
      --data sst2 --sweep 1,0.7,0.5,0.4,0.3,0.2,0.1 --results calibration.json --plot minilm.png
  deftune calibrate --model smollm2 --data squad --sweep 1,0.5,0.3 --results calibration.json
"""

from __future__ import annotations

import argparse
import dataclasses

from deftune.calibration_study import DATA_SOURCES, CalibrationJob, run_calibration

COMMAND = "calibrate"
HELP = "calibrate activation thresholds to a target density; sweep metric vs density"


# ---- command line ------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from deftune.arch import SITE_KINDS
    from deftune.cli._args import field_docs, floats
    from deftune.sparse.calibrate import THRESHOLD_MODES

    docs = field_docs(CalibrationJob)
    parser.add_argument("--model", dest="models", action="append", required=True, metavar="MODEL", help=docs["models"] + " (repeatable)")
    parser.add_argument("--label", dest="labels", action="append", default=None, metavar="LABEL", help=docs["labels"] + " (repeatable)")
    defaults = {f.name: f.default for f in dataclasses.fields(CalibrationJob)}
    parser.add_argument("--data", choices=DATA_SOURCES, default=defaults["data"], help=docs["data"])
    parser.add_argument("--target", type=float, default=defaults["target"], help=docs["target"])
    parser.add_argument("--mode", choices=sorted(THRESHOLD_MODES), default=defaults["mode"], help=docs["mode"])
    parser.add_argument("--site", choices=SITE_KINDS, default=defaults["site"], help=docs["site"])
    parser.add_argument("--output", default=None, help=docs["output"])
    parser.add_argument("--sweep", type=floats, default=(), metavar="D1,D2,...", help=docs["sweep"])
    for key in ("results", "plot", "name", "data_dir", "squad_file"):
        parser.add_argument("--" + key.replace("_", "-"), dest=key, default=None, help=docs[key])
    for key in ("refine_passes", "calib_size", "eval_size", "batch_size", "max_length", "seed", "threads"):
        parser.add_argument("--" + key.replace("_", "-"), dest=key, type=int, default=defaults[key], help=docs[key])


def job_from_args(args: argparse.Namespace) -> CalibrationJob:
    return CalibrationJob(
        models=tuple(args.models), labels=tuple(args.labels or ()), data=args.data, target=args.target,
        mode=args.mode, site=args.site, refine_passes=args.refine_passes, output=args.output, sweep=tuple(args.sweep), results=args.results, plot=args.plot,
        name=args.name, calib_size=args.calib_size, eval_size=args.eval_size, batch_size=args.batch_size,
        max_length=args.max_length, data_dir=args.data_dir, squad_file=args.squad_file, seed=args.seed,
        threads=args.threads,
    )


def run(args: argparse.Namespace) -> int:
    run_calibration(job_from_args(args))
    return 0
