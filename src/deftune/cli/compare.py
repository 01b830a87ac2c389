r"""PEFT vs DEFT over tasks × methods: trains every (task, method, α) run not yet in the results
file (resumable: finished runs are skipped, results are written atomically after each run), then
writes a table and a metric-vs-density plot into the markdown report. Start the same command in
several shells (e.g. one per core, with OMP_NUM_THREADS=1) to share the grid among workers.

Example:
  deftune compare --tasks sst2,mrpc,rte,stsb --methods lora,dora,ia3,prefix,prompt,adapter,bitfit \
      --data-dir ../shared/data/glue
  deftune compare --tasks squad --methods lora --alphas 0,1 --steps 300 --squad-dir ../shared/data/squad \
      --generative-options batch_size=8,eval_questions=1000,act_threshold_density=0.58 \
      --results-json docs/results/squad.json --report-md docs/results_squad.md
"""

from __future__ import annotations

import argparse
from typing import Any

from deftune.cli._args import add_dataclass_arguments, dataclass_from_args, parse_mapping, strs
from deftune.compare import CompareConfig

COMMAND = "compare"
HELP = "PEFT vs DEFT for every task x method; resumable; writes the GLUE table and plot"


def _method_options(value: str) -> dict[str, dict[str, Any]]:
    """``prompt.prompt_init=vocab,prefix.prefix_projection=true`` -> ``{"prompt": {...}, "prefix": {...}}``."""
    out: dict[str, dict[str, Any]] = {}
    for key, v in parse_mapping(value).items():
        method, dot, option = key.partition(".")
        if not (dot and method and option):
            raise argparse.ArgumentTypeError(f"expected METHOD.OPTION=VALUE pairs (prompt.prompt_init=vocab), got {key!r}")
        out.setdefault(method, {})[option] = v
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, CompareConfig, exclude=("tasks", "methods", "method_options"))
    defaults = CompareConfig()
    parser.add_argument("--tasks", type=strs, default=defaults.tasks, help="comma-separated GLUE tasks, or squad (generative QA, see --generative-*)")
    parser.add_argument("--methods", type=strs, default=defaults.methods, help="comma-separated PEFT methods")
    parser.add_argument("--method-options", type=_method_options, default={}, metavar="METHOD.OPTION=V,...",
                        help="per-method MethodConfig options, e.g. prompt.prompt_init=vocab,prefix.prefix_projection=true "
                             "(scalar values; list options such as target_modules: CompareConfig in Python)")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the report from the results file (its runs must match this command's recipe)")


def run(args: argparse.Namespace) -> int:
    from deftune.compare import report_compare, run_compare

    config = dataclass_from_args(CompareConfig, args)
    if args.report_only:
        report_compare(config)
    else:
        run_compare(config)
    print(f"wrote {config.results_json} and {config.report_md}")
    return 0
