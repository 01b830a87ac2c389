"""Fine-tune a model on a GLUE task with a PEFT method, with (α > 0) or without (α = 0) the DEFT
density loss; evaluate on the dev set and save the run directory.

Example:
  deftune train --task sst2 --method lora --alpha 1 --data-dir ../shared/data/glue --output-dir runs/sst2-deft
"""

from __future__ import annotations

import argparse
import json

from deftune.cli._args import add_dataclass_arguments, dataclass_from_args
from deftune.train.config import TrainConfig

COMMAND = "train"
HELP = "fine-tune with PEFT (alpha=0) or DEFT (alpha>0) on a GLUE task and save the run"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, TrainConfig, defaults={"output_dir": None})


def run(args: argparse.Namespace) -> int:
    from deftune.train import train_glue

    config = dataclass_from_args(TrainConfig, args)
    result = train_glue(config)
    print(json.dumps({k: result.to_dict()[k] for k in ("name", "metric", "density", "train_seconds")}, indent=2))
    return 0
