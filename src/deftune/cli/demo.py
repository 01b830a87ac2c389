"""The main job: fine-tune MiniLM on SST-2 with LoRA twice — PEFT (α = 0) and DEFT — on a fixed
training subset, evaluate both on the full dev set, print a side-by-side table (accuracy, exact
density overall and per layer, thresholded density and the accuracy with those activations zeroed,
reduction, wall time), and write results.json plus a per-layer density plot.

Example:
  deftune demo --data-dir ../shared/data/glue
"""

from __future__ import annotations

import argparse

from deftune.cli._args import add_dataclass_arguments, dataclass_from_args
from deftune.demo import DemoConfig

COMMAND = "demo"
HELP = "PEFT vs DEFT on SST-2 with MiniLM + LoRA (the main job of `make demo`)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, DemoConfig, exclude=("recipe",))


def run(args: argparse.Namespace) -> int:
    from deftune.demo import run_demo

    run_demo(dataclass_from_args(DemoConfig, args))
    return 0
