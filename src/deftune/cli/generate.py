"""Fine-tune a causal LM or seq2seq model on SQuAD-style QA with DEFT (or plain PEFT, or
ProSparse ReLU-fication), then report greedy EM / F1, activation density (teacher-forced and
during generation) and perplexity before and after. Every GenConfig field is an option.

Examples:
  deftune qa-train --model smollm2 --alpha 0 --data-dir ../shared/data/squad --output-dir runs/qa-peft
  deftune qa-train --model smollm2 --alpha 1 --loss l0 --data-dir ../shared/data/squad --output-dir runs/qa-deft
  deftune qa-train --model smollm2 --relufy relu --loss l1 --alpha 1 --alpha-schedule sine \\
      --alpha-warmup-steps 200 --data-dir ../shared/data/squad --output-dir runs/qa-prosparse
"""

from __future__ import annotations

import argparse
import json

from deftune.cli._args import add_dataclass_arguments, dataclass_from_args

COMMAND = "qa-train"
HELP = "DEFT / PEFT / ReLU-fication on SQuAD-style generative QA (decoder or encoder-decoder)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from deftune.generative.config import GenConfig

    add_dataclass_arguments(parser, GenConfig)
    parser.add_argument("--json", default=None, help="also write the run summary as JSON to this path")


def run(args: argparse.Namespace) -> int:
    from deftune.generative import GenConfig, train_generative
    from deftune.runs import write_json_atomic

    cfg = dataclass_from_args(GenConfig, args)
    result = train_generative(cfg)
    summary = result.summary()
    print(json.dumps(summary, indent=2))
    if args.json:
        from pathlib import Path

        write_json_atomic(Path(args.json), summary)
    return 0
