"""Measure the MLP activation density of a model (or a run directory) on a GLUE task's sentences,
without training: exact non-zero fraction (in the dtype the model runs in: fp32 here), |a| > τ
fractions, positives, per layer; real tokens only unless --count-padding / --count-virtual-tokens.

Example:
  deftune measure --model minilm --task sst2 --data-dir ../shared/data/glue --json density.json
"""

from __future__ import annotations

import argparse

from deftune.cli._args import positive_int, thresholds

COMMAND = "measure"
HELP = "measure per-layer MLP activation density of a model on task data"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="minilm", help="model name or folder (ignored with --run-dir)")
    parser.add_argument("--run-dir", default=None, help="measure a trained run instead of a base model")
    parser.add_argument("--task", default=None,
                        help="GLUE task whose sentences are fed (default: the run's task with --run-dir, else sst2)")
    parser.add_argument("--split", default="dev", choices=("train", "dev", "validation", "test", "holdout"),
                        help="dataset split; holdout (the training examples a run held out) needs a --run-dir "
                             "trained with --holdout, and train then leaves them out")
    parser.add_argument("--data-dir", default=None,
                        help="GLUE folder (default: the run's with --run-dir, else $DEFTUNE_DATA_DIR)")
    parser.add_argument("--limit", type=positive_int, default=None, help="use at most this many examples")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="batch size")
    parser.add_argument("--max-length", type=positive_int, default=128, help="max tokens per example")
    parser.add_argument("--site", choices=("act", "product"), default="act", help="activation site (gated MLPs)")
    parser.add_argument("--thresholds", type=thresholds, default=(1e-3, 1e-2), help="comma-separated τ for |a| > τ")
    parser.add_argument("--count-padding", action="store_true", help="count padding tokens (official DEFT code)")
    parser.add_argument("--count-virtual-tokens", action="store_true",
                        help="count the virtual tokens of a prompt / P-tuning run (official DEFT code)")
    parser.add_argument("--json", default=None, help="also write the result as JSON to this path")


def run(args: argparse.Namespace) -> int:
    from deftune import models
    from deftune.data.glue import get_task, load_split, make_batches, subsample
    from deftune.density import measure_density
    from deftune.runs import write_json_atomic

    data_dir, holdout = args.data_dir, None
    if args.run_dir:
        from deftune.train import load_run

        model, tokenizer, cfg = load_run(args.run_dir)
        task = get_task(args.task or cfg.task)  # the run's own task and data, unless asked otherwise
        data_dir = data_dir if data_dir is not None else cfg.data_dir
        holdout = cfg.holdout
    else:
        task = get_task(args.task or "sst2")
        model = models.load_for_classification(args.model, task.num_labels)
        tokenizer = models.load_tokenizer(args.model)
    examples = subsample(load_split(task, args.split, data_dir, holdout=holdout), args.limit)
    batches = make_batches(examples, tokenizer, batch_size=args.batch_size, max_length=args.max_length)
    result = measure_density(
        model, batches, site=args.site, thresholds=args.thresholds, count_padding=args.count_padding,
        count_virtual_tokens=args.count_virtual_tokens, progress=True,
    )
    print(result.table(f"Activation density ({task.name} {args.split}, {result.dtype})"))
    if args.json:
        write_json_atomic(args.json, result.to_dict())
    return 0
