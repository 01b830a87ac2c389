"""Re-evaluate a saved generative QA run (from `deftune qa-train --output-dir`): greedy EM / F1 on
its held-out SQuAD questions, activation density (teacher-forced, prefill, decode), perplexity.

Example:
  deftune qa-eval runs/qa-deft --data-dir ../shared/data/squad --eval-questions 100
"""

from __future__ import annotations

import argparse
import json

COMMAND = "qa-eval"
HELP = "re-evaluate a saved generative QA run (EM / F1, density, perplexity)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="run folder written by `deftune qa-train --output-dir`")
    parser.add_argument("--data-dir", default=None, help="SQuAD folder or file (default: the run's)")
    parser.add_argument("--eval-questions", type=int, default=None, help="questions to evaluate (default: the run's; another number also draws other "
                        "perplexity paragraphs, so the perplexity is then not comparable with the run's)")
    parser.add_argument("--device", default=None, choices=("cpu", "cuda", "auto"), help="device (default: the run's)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the run's)")
    parser.add_argument("--site", default=None, choices=("act", "product"),
                        help="activation site whose density is measured (default: the run's): act = the "
                             "activated gate, product = act(gate) * up, the down projection's input")
    parser.add_argument("--json", default=None, help="also write the summary as JSON to this path")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from deftune.generative.train import evaluate_generative_run, write_json_atomic

    overrides = {k: getattr(args, k) for k in ("data_dir", "eval_questions", "device", "threads", "site")
                 if getattr(args, k) is not None}
    report = evaluate_generative_run(args.run_dir, **overrides)
    summary = report.summary()
    print(json.dumps(summary, indent=2))
    if args.json:
        write_json_atomic(Path(args.json), summary)
    return 0
