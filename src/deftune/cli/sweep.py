"""Sweeps over a fine-tuned run: the task metric against a compression or training knob.

Sub-commands (each calls one typed library function)::

  deftune sweep alpha --alphas 0,0.1,0.3,1,3 --task sst2 --method lora
  deftune sweep quant --bits 2,3,4,6,8 --granularities ch,g128 --methods rtn,gptq
  deftune sweep sparsity --levels 0.3,0.5,0.7,0.9 --pattern unstructured --pattern nm:2:4 \\
                         --methods oneshot,recovery --train-levels 0.5

Results are merged into a JSON file (default docs/results/compression.json for quant and sparsity,
docs/results/sweep_alpha.json for alpha) and plotted as PNG.
A new sweep is one entry in :data:`SWEEPS`: ``name -> (help, add_arguments, run)``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from deftune.cli._args import HelpFormatter, floats, ints, strs

COMMAND = "sweep"
HELP = "sweep alpha (DEFT), bits or weight sparsity (compression) and plot the task metric"


def _optional_int(value: str) -> int | None:
    return None if value.lower() in ("", "none", "all") else int(value)


def _common(p: argparse.ArgumentParser, plot: str) -> None:
    p.add_argument("--run-dir", default="runs/compress_base", help="fine-tuned run directory (deftune train --method full)")
    p.add_argument("--data-dir", default=None, help="GLUE folder (default: the run's, or $DEFTUNE_DATA_DIR)")
    p.add_argument("--calib-size", type=int, default=256, help="calibration sentences from the training set")
    p.add_argument("--eval-subset", type=_optional_int, default=None, help="dev examples to evaluate (default: all)")
    p.add_argument("--output", default="docs/results/compression.json", help="results JSON (points are merged in)")
    p.add_argument("--plot", default=plot, help="PNG plot path ('none' for no plot)")
    p.add_argument("--seed", type=int, default=0, help="calibration sample and data order")
    p.add_argument("--threads", type=int, default=1, help="torch threads")


def _add_quant(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bits", type=ints, default=(2, 3, 4, 6, 8), metavar="B,B,...", help="bit widths (2-8)")
    p.add_argument("--granularities", type=strs, default=("ch", "g128"), metavar="G,G,...",
                   help="granularity tokens: tensor, ch (=ch0, per output channel), ch1, g<N>")
    p.add_argument("--asym", action="store_true", help="asymmetric quantization (scale + zero-point)")
    p.add_argument("--clip", default="", help="clipping token: mse or p<percentile> (default: none)")
    p.add_argument("--methods", type=strs, default=("rtn", "gptq"), metavar="M,M,...", help="rtn, gptq, mse, qat")
    p.add_argument("--steps", type=int, default=100, help="QAT fine-tuning steps")
    p.add_argument("--lr", type=float, default=2e-5, help="QAT peak learning rate")
    p.add_argument("--batch-size", type=int, default=32, help="QAT batch size")
    p.add_argument("--no-pack", dest="pack", action="store_false", help="skip real int4/int8 packing")
    _common(p, "docs/img/compression_quant.png")


def _run_quant(args: argparse.Namespace) -> int:
    from deftune.compress.sweep import QuantSweepConfig, quant_sweep

    cfg = QuantSweepConfig(
        run_dir=args.run_dir, bits=args.bits, granularities=args.granularities, asym=args.asym, clip=args.clip,
        methods=args.methods, steps=args.steps, lr=args.lr, batch_size=args.batch_size, calib_size=args.calib_size,
        eval_subset=args.eval_subset, data_dir=args.data_dir, output=args.output, plot=None if args.plot == "none" else args.plot, pack=args.pack, seed=args.seed,
        threads=args.threads,
    )
    section = quant_sweep(cfg)
    print(f"baseline {section['baseline']:.2f}; {len(section['points'])} points in {args.output}")
    return 0


def _add_sparsity(p: argparse.ArgumentParser) -> None:
    from deftune.compress.sparsity import ALLOCATIONS

    p.add_argument("--levels", type=floats, default=(0.3, 0.5, 0.7, 0.9), metavar="S,S,...", help="sparsity levels")
    p.add_argument("--pattern", dest="patterns", action="append", default=None,
                   help="pattern template, repeatable: unstructured, block:4x4, channel, nm:2:4 (default: unstructured and nm:2:4)")
    p.add_argument("--methods", type=strs, default=("oneshot", "recovery"), metavar="M,M,...",
                   help="oneshot, mse, recovery, gmp, rigl")
    p.add_argument("--train-levels", type=floats, default=(0.5,), metavar="S,S,...",
                   help="levels at which the training methods (recovery, gmp, rigl) run")
    p.add_argument("--allocation", default="uniform", choices=ALLOCATIONS,
                   help="how each level is spread over layers")
    p.add_argument("--steps", type=int, default=100, help="recovery fine-tuning steps")
    p.add_argument("--lr", type=float, default=5e-5, help="recovery peak learning rate")
    p.add_argument("--batch-size", type=int, default=32, help="recovery batch size")
    _common(p, "docs/img/compression_sparsity.png")


def _run_sparsity(args: argparse.Namespace) -> int:
    from deftune.compress.sweep import SparsitySweepConfig, sparsity_sweep

    cfg = SparsitySweepConfig(
        run_dir=args.run_dir, levels=args.levels, patterns=tuple(args.patterns or ("unstructured", "nm:2:4")),
        methods=args.methods, train_levels=args.train_levels, allocation=args.allocation, steps=args.steps,
        lr=args.lr, batch_size=args.batch_size, calib_size=args.calib_size, eval_subset=args.eval_subset,
        data_dir=args.data_dir, output=args.output, plot=None if args.plot == "none" else args.plot,
        seed=args.seed, threads=args.threads,
    )
    section = sparsity_sweep(cfg)
    print(f"baseline {section['baseline']:.2f}; {len(section['points'])} points in {args.output}")
    return 0


def _add_alpha(p: argparse.ArgumentParser) -> None:
    from deftune.cli._args import add_dataclass_arguments
    from deftune.compare import AlphaSweepConfig

    add_dataclass_arguments(p, AlphaSweepConfig)


def _run_alpha(args: argparse.Namespace) -> int:
    from deftune.cli._args import dataclass_from_args
    from deftune.compare import AlphaSweepConfig, run_alpha_sweep

    config = dataclass_from_args(AlphaSweepConfig, args)
    rows = run_alpha_sweep(config)
    for r in sorted(rows, key=lambda r: r["alpha"]):
        print(f"alpha {r['alpha']:g}: {r['metric']['name']} {r['metric']['value']:.2f}, exact density {r['density']:.4f}")
    print(f"wrote {config.results_json} and {config.plot}")
    return 0


SWEEPS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "quant": ("task metric against weight bits (RTN, GPTQ, MSE reconstruction)", _add_quant, _run_quant),
    "sparsity": ("task metric against weight sparsity (one-shot, recovery, GMP, RigL)", _add_sparsity, _run_sparsity),
    "alpha": ("task metric and exact density against the density-loss weight alpha (DEFT's sweet spot)",
              _add_alpha, _run_alpha),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="sweep", metavar="SWEEP", required=True)
    for name, (help_text, add, run_fn) in SWEEPS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=HelpFormatter)
        add(p)
        p.set_defaults(_sweep_run=run_fn)


def run(args: argparse.Namespace) -> int:
    return args._sweep_run(args)
