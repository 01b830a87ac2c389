"""Issue #3: the held-out search for prompt- and prefix-tuning recipes, and its rule.

Prompt and prefix tuning barely learn the GLUE tasks at the compare grid's budget, so their
baseline recipe was tuned the usual way before any DEFT run with it was looked at: dense PEFT
only (α = 0), scored on 500 training examples held out of training (``--holdout 500``), seeds 0–1,
the four tasks. Candidates:

* prompt tuning: lr 0.03 / 0.1 / 0.3 × virtual tokens starting ``random`` / ``vocab``;
* prefix tuning: lr 0.01 / 0.03 / 0.1 × without / with the prefix projection (Li & Liang 2021).

Rule (fixed before the runs): per method, the candidate with the highest mean held-out metric
over its (task, seed) runs. Each candidate is one ``deftune compare`` grid with a results file of
its own (a results file holds one recipe); ``--commands`` prints them. The rows of all candidates
are pooled in one file (``docs/results/glue_recipe_holdout.json``); this script groups them by
recipe (learning rate and method options, :func:`deftune.compare.grid.recipe`), prints the table
and the choice, and writes ``docs/results/prompt_recipe_search.json``. No training happens here.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path
from statistics import fmean
from typing import Any

from deftune.compare import load_rows
from deftune.compare.grid import format_method_options, recipe
from deftune.compare.pairs import variant
from deftune.runs import write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
RESULTS = "docs/results/glue_recipe_holdout.json"
TASKS, SEEDS, HOLDOUT = ("sst2", "mrpc", "rte", "stsb"), (0, 1), 500
CANDIDATES: dict[str, list[tuple[float, dict[str, Any]]]] = {
    "prompt": [(lr, {"prompt_init": init}) for lr in (0.03, 0.1, 0.3) for init in ("random", "vocab")],
    "prefix": [(lr, {"prefix_projection": proj}) for lr in (0.01, 0.03, 0.1) for proj in (False, True)],
}


def _label(lr: float, options: dict[str, Any]) -> str:
    return f"lr {lr:g}" + "".join(f", {k}={v}" for k, v in sorted(options.items()))


def commands() -> list[str]:
    """The ``deftune compare`` grid of every candidate (one results file each)."""
    out = []
    for method, candidates in CANDIDATES.items():
        for lr, options in candidates:
            tag = "_".join([method, f"lr{lr:g}", *(f"{k}-{v}" for k, v in options.items())])
            out.append(
                f"deftune compare --tasks {','.join(TASKS)} --methods {method} --alphas 0 "
                f"--seeds {','.join(map(str, SEEDS))} --holdout {HOLDOUT} --method-lr {method}={lr:g} "
                f"--method-options {format_method_options({method: options})}"
                f" --data-dir ../shared/data/glue --results-json runs/recipe/{tag}.json --report-md runs/recipe/{tag}.md"
            )
    return out


def search(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per method: every candidate's mean held-out metric (and per task), and the chosen one.

    Only the planned runs count (dense, held out ``HOLDOUT`` examples, ``TASKS`` × ``SEEDS``); a
    candidate with fewer than all of them is listed but cannot be chosen (``complete``)."""
    groups: dict[tuple[str, float, tuple], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        planned = r["task"] in TASKS and int(r.get("seed", 0)) in SEEDS and r.get("holdout") == HOLDOUT
        if not planned or r.get("eval_split") != "holdout" or variant(r) != 0.0:
            continue
        rec = recipe(r)
        groups[(r["method"], rec["lr"], tuple(sorted(rec["method_options"].items())))].append(r)
    out: dict[str, Any] = {}
    for method in sorted({k[0] for k in groups}):
        cands = []
        for (m, lr, opts), rs in groups.items():
            if m != method:
                continue
            by_task: dict[str, list[float]] = defaultdict(list)
            for r in rs:
                by_task[r["task"]].append(r["metric"]["value"])
            cands.append({"lr": lr, "method_options": dict(opts), "runs": len(rs),
                          "complete": len({(r["task"], int(r.get("seed", 0))) for r in rs}) == len(TASKS) * len(SEEDS),
                          "mean": fmean(r["metric"]["value"] for r in rs),
                          "per_task": {t: fmean(v) for t, v in sorted(by_task.items())}})
        cands.sort(key=lambda c: -c["mean"])
        eligible = [c for c in cands if c["complete"]]
        chosen = {k: eligible[0][k] for k in ("lr", "method_options")} if eligible else None
        out[method] = {"candidates": cands, "chosen": chosen}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=RESULTS, help="pooled rows of the candidates' grids (relative: to the repository)")
    ap.add_argument("--out", default=str(ROOT / "docs/results/prompt_recipe_search.json"), help="JSON output")
    ap.add_argument("--commands", action="store_true", help="print the candidates' commands and exit")
    args = ap.parse_args()
    if args.commands:
        print("\n".join(commands()))
        return
    result = search(load_rows(ROOT / args.results))
    for method, s in result.items():
        print(f"\n{method} tuning (dense, held-out metric, mean over tasks × seeds):\n")
        print("| recipe | runs | mean | " + " | ".join(TASKS) + " |")
        print("|---|---|---|" + "---|" * len(TASKS))
        for c in s["candidates"]:
            chosen = " (chosen)" if {k: c[k] for k in ("lr", "method_options")} == s["chosen"] else ""
            chosen += "" if c["complete"] else " (incomplete: not eligible)"
            print(f"| {_label(c['lr'], c['method_options'])}{chosen} | {c['runs']} | {c['mean']:.2f} | "
                  + " | ".join(f"{c['per_task'].get(t, float('nan')):.1f}" for t in TASKS) + " |")
    write_json_atomic(args.out, {"note": "recomputed from the results file by benchmarks/prompt_recipe_search.py",
                                 "results": args.results, "methods": result})
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
