"""Fine-tune a model with a PEFT method, with (α > 0) or without (α = 0) the DEFT density loss;
evaluate and save the run directory.

GLUE tasks (sst2, cola, mrpc, rte, stsb, qnli, ...) train a classifier (`deftune.train.train_glue`).
`--task squad` trains a generative QA model (default `--model smollm2`) through
`deftune.generative.train_generative`: the options typed on the command line are passed on, and
every other option takes `deftune qa-train`'s default (α 0, 200 steps, batch 8, ...), not the
GLUE default shown below; `deftune qa-train --help` lists the full option set and its defaults.

Examples:
  deftune train --task sst2 --method lora --alpha 1 --data-dir ../shared/data/glue --output-dir runs/sst2-deft
  deftune train --task squad --model smollm2 --alpha 1 --data-dir ../shared/data/squad --output-dir runs/squad-deft
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from deftune.cli._args import add_dataclass_arguments, dataclass_from_args, given_options
from deftune.train.config import TrainConfig

COMMAND = "train"
HELP = "fine-tune with PEFT (alpha=0) or DEFT (alpha>0) on a GLUE task (or squad) and save the run"

# TrainConfig fields that carry over to the generative config for --task squad
_SHARED_WITH_GENERATIVE = ("method", "alpha", "loss", "eps", "site", "stack_weights", "steps", "batch_size",
                           "lr", "lr_warmup_steps", "weight_decay", "train_subset", "data_dir", "output_dir", "seed",
                           "log_every")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, TrainConfig, defaults={"output_dir": None})
    parser.add_argument("--overwrite", action="store_true",
                        help="train into an --output-dir that holds a finished run (its files are replaced)")


def _refuse_finished_run(args: argparse.Namespace) -> None:
    """A finished run's folder is not trained into again by mistake: training starts by removing
    its results (so that a run cut short is never taken for finished)."""
    from pathlib import Path

    from deftune.runs import RESULTS_FILE

    if args.output_dir and not args.overwrite and (Path(args.output_dir) / RESULTS_FILE).is_file():
        raise ValueError(f"--output-dir {args.output_dir} holds a finished run ({RESULTS_FILE}); choose another "
                         "folder, or pass --overwrite to replace it")


def _unused_by_squad(given: set[str]) -> list[str]:
    """The GLUE-only flags given on the command line, which ``--task squad`` would not use."""
    used = {*_SHARED_WITH_GENERATIVE, "task", "model", "schedule", "warmup_steps"}
    return [f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(TrainConfig)
            if f.name in given and f.name not in used]


def _train_squad(args: argparse.Namespace) -> int:
    from deftune.generative import GenConfig, train_generative

    given = given_options(args)
    if unused := _unused_by_squad(given):
        raise ValueError(f"--task squad does not use {', '.join(unused)} (GLUE options); run `deftune qa-train`, "
                         "whose --help lists the generative options (e.g. --act-threshold-density, "
                         "--act-threshold-warmup-steps)")
    # only the options typed: the rest keep GenConfig's defaults (qa-train's), not TrainConfig's
    values = {k: getattr(args, k) for k in _SHARED_WITH_GENERATIVE if k in given}
    for train_name, gen_name in (("schedule", "alpha_schedule"), ("warmup_steps", "alpha_warmup_steps")):
        if train_name in given:
            values[gen_name] = getattr(args, train_name)
    if "model" in given:
        values["model"] = args.model
    config = GenConfig(**values)
    result = train_generative(config)
    print(json.dumps(result.summary(), indent=2))
    return 0


def run(args: argparse.Namespace) -> int:
    _refuse_finished_run(args)
    if args.task.lower() == "squad":
        return _train_squad(args)
    from deftune.train import train_glue

    config = dataclass_from_args(TrainConfig, args)
    result = train_glue(config)
    print(json.dumps({k: result.to_dict()[k] for k in ("name", "metric", "density", "train_seconds")}, indent=2))
    return 0
