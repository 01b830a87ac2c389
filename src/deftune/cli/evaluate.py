"""Reload a finished run directory and re-measure its dev metric and activation density.

Example:
  deftune evaluate runs/demo/deft
"""

from __future__ import annotations

import argparse

COMMAND = "evaluate"
HELP = "reload a run directory and re-measure its task metric and density"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run directory written by `deftune train` / `deftune demo`")
    parser.add_argument("--data-dir", default=None, help="GLUE folder (default: the one the run used, or $DEFTUNE_DATA_DIR)")
    parser.add_argument("--split", default="dev", help="dataset split to evaluate: dev, train, or holdout (the training examples a --holdout run held out)")


def run(args: argparse.Namespace) -> int:
    from deftune.train import evaluate_glue, load_run

    model, tokenizer, config = load_run(args.run_dir)
    if args.data_dir is not None:
        config.data_dir = args.data_dir
    result = evaluate_glue(model, tokenizer, config, split=args.split, progress=True)
    print(", ".join(f"{k} = {v:.2f}" for k, v in result.metrics.items()))
    print(result.density.table(f"Activation density ({config.task} {args.split}, fp32, real tokens)"))
    return 0
