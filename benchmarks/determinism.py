"""Does a run repeat, and what does ``--deterministic`` cost?

Trains the same GLUE cells several times with and without ``TrainConfig.deterministic`` (torch's
deterministic algorithms, :mod:`deftune.determinism`) and reports, per cell and setting, whether
the repeats agree bit for bit (metric and exact density) and the median training seconds. The
cells are `deftune compare`'s (``CompareConfig``: MiniLM, 250 steps × batch 32, the method's
learning rate, plain PEFT without learned scales), dense and, with ``--threshold-densities``, the
ramped threshold route. Settings alternate run by run, so machine noise hits both alike.

Prints a table and writes ``docs/results/determinism.json``. Run (GPU: the CPU repeats anyway):
``python benchmarks/determinism.py --data-dir ../shared/data/glue``.
"""

from __future__ import annotations

import argparse
import statistics
import sys


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None, help="GLUE folder (default $DEFTUNE_DATA_DIR)")
    p.add_argument("--task", default="mrpc", help="GLUE task")
    p.add_argument("--methods", default="lora,prefix", help="comma-separated methods")
    p.add_argument("--threshold-densities", default="0.55", help="threshold-route cells too ('' for none)")
    p.add_argument("--threshold-ramp", type=int, default=200, help="their ramp (steps)")
    p.add_argument("--repeats", type=int, default=2, help="runs per cell and setting")
    p.add_argument("--steps", type=int, default=250, help="training steps per run")
    p.add_argument("--seed", type=int, default=0, help="the cells' seed")
    p.add_argument("--out", default="docs/results/determinism.json", help="JSON output")
    args = p.parse_args()

    from deftune.compare.grid import CompareConfig
    from deftune.hardware import describe
    from deftune.runs import write_json_atomic
    from deftune.train import train_glue

    densities = tuple(float(d) for d in args.threshold_densities.split(",") if d)
    grid = CompareConfig(tasks=(args.task,), methods=tuple(args.methods.split(",")), alphas=(0.0,), steps=args.steps,
                         seeds=(args.seed,), act_scale="none", threshold_densities=densities,
                         threshold_ramp=args.threshold_ramp if densities else 0, data_dir=args.data_dir)
    cells = grid.runs()
    rows = []
    for config in cells:
        config.output_dir = None  # nothing saved: only the results are compared
        results: dict[bool, list] = {False: [], True: []}
        for _ in range(args.repeats):
            for deterministic in (False, True):  # alternating
                config.deterministic = deterministic
                results[deterministic].append(train_glue(config, progress=False))
        for deterministic, runs in results.items():
            outcomes = {(r.metric["value"], r.density["exact"]) for r in runs}
            rows.append({
                "cell": config.run_name, "deterministic": deterministic, "repeats": len(runs),
                "identical": len(outcomes) == 1, "metric": [r.metric["value"] for r in runs],
                "density": [r.density["exact"] for r in runs],
                "median_train_seconds": statistics.median(r.train_seconds for r in runs),
            })
    base = {r["cell"]: r["median_train_seconds"] for r in rows if not r["deterministic"]}
    print(f"{'cell':<24}{'deterministic':>14}{'identical':>10}{'train s':>9}{'vs off':>8}  metric")
    for r in rows:
        r["time_ratio"] = r["median_train_seconds"] / base[r["cell"]]
        metrics = ", ".join(f"{m:.3f}" for m in r["metric"])
        print(f"{r['cell']:<24}{r['deterministic']!s:>14}{r['identical']!s:>10}{r['median_train_seconds']:>9.2f}"
              f"{r['time_ratio']:>8.2f}  {metrics}")
    hw = describe()
    print(f"hardware: {hw}")
    write_json_atomic(args.out, {"rows": rows, "task": args.task, "steps": args.steps, "seed": args.seed,
                                 "hardware": hw, "command": " ".join(["python", *sys.argv])})


if __name__ == "__main__":
    main()
