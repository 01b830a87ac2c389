"""Every GLUE protocol of issue #3 against the target, recomputed from the results files.

The target (averaged over the task × method pairs: exact density ≥ 40 % below PEFT's, dev metric
within 1 point) has been measured under several protocols — fixed α, α chosen on held-out data or
on other seeds, a longer budget, the threshold route, the CPU. Their numbers live in different
results files; this script pools each protocol's DEFT-vs-PEFT pairs with the same code as the
``deftune compare`` report (:func:`deftune.compare.pairs.summarise`,
:func:`deftune.compare.select_alpha.select_alphas`) so that the "At a glance" table of
``docs/results.md`` is a command's output, not arithmetic by hand.

Prints a markdown table (and each protocol's worst task × method cells) and writes
``docs/results/glue_protocols.json``: ``python benchmarks/glue_protocols.py``; with
``--update-md docs/results.md`` it also puts the table into the docs (a test checks they agree). No training happens.
A protocol whose files are missing, or whose grid is not finished (fewer pairs than PEFT runs, or
fewer seeds than asked), is marked so instead of being scored as if complete. SE is the standard
error of the metric change over seeds (seed-to-seed noise only, not dev-set sampling).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean, stdev
from typing import Any

from deftune.compare import load_rows
from deftune.compare.grid import recipe
from deftune.compare.pairs import density_change, summarise, variant
from deftune.compare.select_alpha import missing_at_choice, select_alphas, selected_summary
from deftune.runs import read_json, write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
R = "docs/results/"  # results files, relative to the repository root
# dense PEFT without learned activation scales (α = 0, act_scale none; seeds 0–9, 250 steps, H100),
# the baseline of the table's last column; its file also holds the no-scale threshold runs
PLAIN = R + "glue_plain_peft.json"
GLANCE, INDENT = "* **At a glance**", "  "  # the table in docs/results.md: under this bullet, indented
# prompt tuning re-run with its density on real tokens (seventeenth session): the ramped route at
# 250 and 750 steps (plain PEFT twins included) and the density loss with learned scales
REAL_PROMPT = tuple(R + f"glue_prompt_real_{x}.json" for x in ("ramp200", "ramp_long", "alpha"))


@dataclass(frozen=True)
class Protocol:
    """One row of the table: which runs are pooled, and how the DEFT variant of each task is chosen.

    Attributes:
        id: a stable key for the JSON output.
        label: the variant (``α = 0.1``, ``per task``, ``0 + thresholds 0.55``).
        how: how it was chosen / what it tests.
        files: results files (relative to the repository root) whose rows are pooled, α = 0 included.
        seeds: the seeds reported.
        key: the variant compared with PEFT: a fixed α (float) or a threshold-route key (``"t0.55"``,
            :func:`deftune.compare.pairs.variant`); ``None`` when ``select_from`` chooses α per task.
        select_from: a results file to choose α per task on (held-out grid or other seeds' dev results).
        tolerance: the selection rule's tolerance in points.
        method_files: ``(file, methods)`` pairs: the rows of these methods come from that file (a
            recipe of their own) and are dropped from ``files``.
    """

    id: str
    label: str
    how: str
    files: tuple[str, ...]
    seeds: tuple[int, ...]
    key: float | str | None = None
    select_from: str | None = None
    tolerance: float = 1.0
    method_files: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def __post_init__(self) -> None:
        if (self.key is None) == (self.select_from is None):
            raise ValueError(f"protocol {self.id!r}: give exactly one of key (a fixed variant) and select_from")
        both = sorted(set(self.files) & {f for f, _ in self.method_files})
        if both:
            raise ValueError(f"protocol {self.id!r}: {both} in both files and method_files (its rows would count twice)")
        if self.method_files and self.select_from is not None:
            raise ValueError(f"protocol {self.id!r}: select_from chooses α on one file's recipes; it does not take "
                             "method_files")


S04, S59 = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
# the method the table also leaves out (JSON: every method): prompt tuning barely learns SST-2 and
# MRPC at this budget (the majority class on most seeds), so its pairs are mostly noise
LEFT_OUT = "prompt"
PROTOCOLS = (
    Protocol("a0.1", "α = 0.1", "the recipe's, fixed before the runs", (R + "glue.json",), S04, 0.1),
    Protocol("holdout", "per task", "held-out training examples, rule fixed first", (R + "glue.json",), S04,
             select_from=R + "glue_holdout.json"),
    Protocol("a0.075", "α = 0.075", "sensitivity", (R + "glue.json",), S04, 0.075),
    Protocol("a0.05", "α = 0.05", "sensitivity; inside the corner, but picked on these dev results",
             (R + "glue.json",), S04, 0.05),
    Protocol("a0.05-fresh", "α = 0.05", "confirmation on fresh seeds", (R + "glue_seeds5_9.json",), S59, 0.05),
    Protocol("a0.05-ten", "α = 0.05", "all ten seeds", (R + "glue.json", R + "glue_seeds5_9.json"), S04 + S59, 0.05),
    Protocol("other-seeds", "per task", "dev results of seeds 0–4 (tolerance 0.5), reported on fresh seeds",
             (R + "glue_seeds5_9.json",), S59, select_from=R + "glue.json", tolerance=0.5),
    Protocol("long-a0.1", "α = 0.1", "3× budget (750 steps)", (R + "glue_long.json",), (0,), 0.1),
    Protocol("long-a0.05", "α = 0.05", "3× budget (750 steps)", (R + "glue_long.json",), (1,), 0.05),
    Protocol("thr", "0 + thresholds 0.55", "threshold route (no density loss), target fixed first",
             (R + "glue_thresholds.json",), S04, "t0.55"),
    Protocol("thr-eight", "0 + thresholds 0.55", "the same, 3 seeds added after its near miss; margin inside the SE",
             (R + "glue_thresholds.json",), (0, 1, 2, 3, 4, 5, 6, 7), "t0.55"),
    Protocol("thr-ten", "0 + thresholds 0.55", "the same on ten seeds: seeds 8–9 planned after seeds 0–7",
             (R + "glue_thresholds.json",), S04 + S59, "t0.55"),
    Protocol("thr-noscale", "0 + thresholds 0.55, no learned scales", "exploratory, planned after reading the worst STS-B "
             "pairs; a lead for a ten-seed run, not a result", (R + "glue_thresholds_noscale.json",), (0, 1, 2), "t0.55"),
    Protocol("thr-noscale-fresh", "0 + thresholds 0.55, no learned scales", "the same recipe on fresh seeds 3–9: the "
             "planned evaluation (ninth session)", (R + "glue_thresholds_noscale.json",), (3, 4) + S59, "t0.55"),
    Protocol("thr-noscale-ten", "0 + thresholds 0.55, no learned scales", "all ten seeds (0–2 exploratory, 3–9 planned)",
             (R + "glue_thresholds_noscale.json",), S04 + S59, "t0.55"),
    Protocol("thr-noscale-plain-fresh", "0 + thresholds 0.55, no learned scales", "the same runs against dense PEFT "
             "without learned scales (like for like; planned after the seeds 3–9 row was read)",
             (R + "glue_plain_peft.json",), (3, 4) + S59, "t0.55"),
    Protocol("thr-noscale-plain-ten", "0 + thresholds 0.55, no learned scales", "the same, all ten seeds",
             (R + "glue_plain_peft.json",), S04 + S59, "t0.55"),
    Protocol("a0.1-s01", "α = 0.1", "the recipe's, seeds 0–1 only: the reference of the next row",
             (R + "glue.json",), (0, 1), 0.1),
    Protocol("a0.1-scale-lr0.01", "α = 0.1, scale lr 0.01", "exploratory (ninth session, planned after the "
             "baseline gap was read): a slower scale", (R + "glue_scale_lr001.json",), (0, 1), 0.1),
    *(Protocol(f"a0.1-density-scales-lr{lr}", f"α = 0.1, scales moved by the density loss only, SGD lr {lr}",
               "exploratory (tenth session, plan fixed first): its baseline is plain PEFT",
               (R + f"glue_density_scales_lr{lr}.json",), (0,), 0.1) for lr in (2, 3, 4)),
    Protocol("a0.1-density-scales-fresh", "α = 0.1, scales moved by the density loss only, SGD lr 3",
             "lr chosen on seed 0 by the rule fixed first; the planned evaluation on fresh seeds 1–4",
             (R + "glue_density_scales_lr3.json",), (1, 2, 3, 4), 0.1),
    Protocol("a0.1-density-scales-five", "α = 0.1, scales moved by the density loss only, SGD lr 3",
             "the same, seeds 0–4", (R + "glue_density_scales_lr3.json",), S04, 0.1),
    Protocol("a0.1-warmup200", "α = 0.1 warmed up over 200 of 250 steps",
             "exploratory (thirteenth session, plan fixed first): the thresholds' ramp for the density loss; "
             "its baseline is plain PEFT", (R + "glue_density_warmup200.json",), (0, 1), 0.1),
    Protocol("a0.1-750-warmup600", "α = 0.1 warmed up over 600 of 750 steps",
             "the same at 3× budget; its baseline is plain PEFT at 750 steps",
             (R + "glue_density_long_warmup600.json",), (0, 1), 0.1),
    *(Protocol(f"a{a}-target{t}", f"α = {a:g}, density target {t} per layer (hinge)",
               "exploratory (thirteenth session, plan fixed first): its baseline is plain PEFT",
               (R + f"glue_density_target{t}.json",), (0, 1), a) for t in ("0.45", "0.35") for a in (0.3, 1.0)),
    *(Protocol(f"thr-noscale-ramp{n}", f"0 + thresholds 0.55 ramped in over {n} steps, no learned scales",
               "exploratory (tenth session, plan fixed first): its baseline is plain PEFT",
               (R + f"glue_thresholds_ramp{n}.json",), (0, 1), "t0.55") for n in (100, 200)),
    Protocol("thr-noscale-ramp200-fresh", "0 + thresholds 0.55 ramped in over 200 steps, no learned scales",
             "ramp chosen on seeds 0–1 by the rule fixed first; the planned evaluation on fresh seeds 2–6",
             (R + "glue_thresholds_ramp200.json",), (2, 3, 4, 5, 6), "t0.55"),
    Protocol("thr-noscale-ramp200-seven", "0 + thresholds 0.55 ramped in over 200 steps, no learned scales",
             "the same, seeds 0–6", (R + "glue_thresholds_ramp200.json",), (0, 1, 2, 3, 4, 5, 6), "t0.55"),
    Protocol("thr-noscale-ramp200-ten", "0 + thresholds 0.55 ramped in over 200 steps, no learned scales",
             "the same, ten seeds (7–9 planned after seeds 2–6 were read)", (R + "glue_thresholds_ramp200.json",),
             S04 + S59, "t0.55"),
    *(Protocol(f"thr-noscale-ramp200-d{d}", f"0 + thresholds {d} ramped in over 200 steps, no learned scales",
               "exploratory (tenth session, after the evaluation): how far the ramped route goes",
               (R + "glue_thresholds_ramp200_densities.json",), (0, 1), f"t{d}") for d in ("0.45", "0.35")),
    Protocol("thr-noscale-ramp200-d0.45-fresh", "0 + thresholds 0.45 ramped in over 200 steps, no learned scales",
             "planned after the curve was read: fresh seeds 2–4", (R + "glue_thresholds_ramp200_densities.json",),
             (2, 3, 4), "t0.45"),
    Protocol("thr-noscale-ramp200-d0.45-five", "0 + thresholds 0.45 ramped in over 200 steps, no learned scales",
             "the same, seeds 0–4", (R + "glue_thresholds_ramp200_densities.json",), S04, "t0.45"),
    Protocol("thr-noscale-ramp600-750", "0 + thresholds 0.55 ramped in over 600 of 750 steps, no learned scales",
             "exploratory (eleventh session, plan fixed first): 3× budget; its baseline is plain PEFT at 750 steps",
             (R + "glue_ramp_long.json",), (0, 1), "t0.55"),
    Protocol("thr-noscale-ramp600-750-fresh", "0 + thresholds 0.55 ramped in over 600 of 750 steps, no learned scales",
             "the same recipe on fresh seeds 2–4: the planned evaluation (twelfth session)",
             (R + "glue_ramp_long.json",), (2, 3, 4), "t0.55"),
    Protocol("thr-noscale-ramp600-750-five", "0 + thresholds 0.55 ramped in over 600 of 750 steps, no learned scales",
             "the same, seeds 0–4", (R + "glue_ramp_long.json",), S04, "t0.55"),
    Protocol("vocab-a0.1", "α = 0.1", "prompt tuning's start tuned on held-out data (`vocab`), plan fixed first",
             (R + "glue.json",), S04, 0.1, method_files=((R + "glue_prompt_vocab.json", ("prompt",)),)),
    Protocol("vocab-thr", "0 + thresholds 0.55", "the same tuned prompt tuning, threshold route; its prompt-tuning baseline learns little (see the next column)",
             (R + "glue_thresholds.json",), S04, "t0.55", method_files=((R + "glue_prompt_vocab.json", ("prompt",)),)),
    Protocol("vocab-thr-eight", "0 + thresholds 0.55", "the same, seeds 5–7 added after reading seeds 0–4; the same caveat",
             (R + "glue_thresholds.json",), (0, 1, 2, 3, 4, 5, 6, 7), "t0.55",
             method_files=((R + "glue_prompt_vocab.json", ("prompt",)),)),
    Protocol("vocab-thr-ten", "0 + thresholds 0.55", "tuned prompt tuning, threshold route, ten seeds (8–9 planned); "
             "the same caveat", (R + "glue_thresholds.json",), S04 + S59, "t0.55",
             method_files=((R + "glue_prompt_vocab.json", ("prompt",)),)),
    Protocol("vocab-a0.05-ten", "α = 0.05", "the same tuned prompt tuning, all ten seeds; not planned (α 0.05 was picked on seeds 0–4); the same caveat",
             (R + "glue.json", R + "glue_seeds5_9.json"), S04 + S59, 0.05,
             method_files=((R + "glue_prompt_vocab.json", ("prompt",)),)),
    Protocol("cpu-a0.1", "α = 0.1", "CPU (2 cores), the recipe's", (R + "glue_cpu.json",), (0,), 0.1),
    Protocol("cpu-thr", "0 + thresholds 0.55", "threshold route on the CPU (a cross-check)",
             (R + "glue_cpu_thresholds.json",), (0,), "t0.55"),
    Protocol("cpu-thr-ramp200", "0 + thresholds 0.55 ramped in over 200 steps, no learned scales",
             "the ramped route on the CPU (a cross-check, all 28 cells); its "
             "baseline is plain PEFT on the CPU", (R + "glue_cpu_ramp.json",), (0,), "t0.55"),
    # seventeenth session: the prompt-tuning cells re-run with the density counted on real tokens
    # (REAL_PROMPT); the other six methods' rows are those of the protocol above of the same id
    *(Protocol(f"{base}-real", label, how + "; prompt tuning re-run, its density on real tokens",
               files, seeds, key, method_files=((R + f"glue_prompt_real_{real}.json", ("prompt",)),))
      for base, label, how, files, seeds, key, real in (
          ("thr-noscale-ramp200-fresh", "0 + thresholds 0.55 ramped in over 200 steps, no learned scales",
           "the planned evaluation, fresh seeds 2–6", (R + "glue_thresholds_ramp200.json",), (2, 3, 4, 5, 6),
           "t0.55", "ramp200"),
          ("thr-noscale-ramp200-ten", "0 + thresholds 0.55 ramped in over 200 steps, no learned scales",
           "ten seeds", (R + "glue_thresholds_ramp200.json",), S04 + S59, "t0.55", "ramp200"),
          ("thr-noscale-ramp600-750-fresh", "0 + thresholds 0.55 ramped in over 600 of 750 steps, no learned scales",
           "the planned evaluation, fresh seeds 2–4", (R + "glue_ramp_long.json",), (2, 3, 4), "t0.55",
           "ramp_long"),
          ("thr-noscale-ramp600-750-five", "0 + thresholds 0.55 ramped in over 600 of 750 steps, no learned scales",
           "seeds 0–4", (R + "glue_ramp_long.json",), S04, "t0.55", "ramp_long"),
          ("a0.1", "α = 0.1", "the recipe's, fixed before the runs", (R + "glue.json",), S04, 0.1,
           "alpha"),
          ("a0.05", "α = 0.05", "sensitivity, seeds 0–4", (R + "glue.json",), S04, 0.05, "alpha"),
          # eighteenth session: the remaining rows of the verdict table
          ("a0.1-density-scales-five", "α = 0.1, scales moved by the density loss only, SGD lr 3", "seeds 0–4",
           (R + "glue_density_scales_lr3.json",), S04, 0.1, "density_scales"),
          ("a0.1-warmup200", "α = 0.1 warmed up over 200 of 250 steps", "exploratory, seeds 0–1",
           (R + "glue_density_warmup200.json",), (0, 1), 0.1, "warmup200"),
          ("a0.1-750-warmup600", "α = 0.1 warmed up over 600 of 750 steps", "exploratory, seeds 0–1; its "
           "baseline is plain PEFT at 750 steps", (R + "glue_density_long_warmup600.json",), (0, 1), 0.1,
           "long_warmup600"),
          *((f"a{a}-target{t}", f"α = {a:g}, density target {t} per layer (hinge)", "exploratory, seeds 0–1",
             (R + f"glue_density_target{t}.json",), (0, 1), a, f"target{t}") for t in ("0.45", "0.35") for a in (0.3, 1.0)),
      )),
)


def _hardware(data: Any) -> str:
    """The GPU (or ``CPU``) of a results file's hardware record — the machine that appended its last
    row; ``unknown`` without a record."""
    record = data.get("hardware") if isinstance(data, dict) else None
    if not isinstance(record, dict):
        return "unknown"
    return str(record.get("gpu") or "CPU")


def _pool(leaves: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Pair-weighted mean of per-method summary leaves (as ``summarise``'s ``overall``); None: no pairs."""
    n = sum(v["pairs"] for v in leaves)
    if n == 0:
        return None
    return {"pairs": n, **{k: sum(v["pairs"] * v[k] for v in leaves) / n for k in ("density_reduction_pct", "metric_delta")}}


def evaluate(p: Protocol, root: Path = ROOT) -> dict[str, Any]:
    """The pooled pairs of one protocol, with completeness: ``status`` is ``ok``, ``incomplete``
    (fewer pairs than PEFT runs, or fewer seeds than asked) or ``missing`` (no file, or no pairs)."""
    source = {m: f for f, methods in p.method_files for m in methods}  # method -> the file its rows come from
    names = list(p.files) + [f for f, _ in p.method_files]
    files = [root / f for f in names]
    out: dict[str, Any] = {"id": p.id, "label": p.label, "how": p.how, "files": names}
    absent = [str(f) for f, path in zip(names, files) if not path.is_file()]
    if p.select_from is not None and not (root / p.select_from).is_file():
        absent.append(p.select_from)
    if absent:
        return {**out, "status": "missing", "absent": absent}
    data = [read_json(f) for f in files]  # each file read once: rows and hardware record
    rows = [r for name, d in zip(names, data) for r in (d["runs"] if isinstance(d, dict) else d)
            if int(r.get("seed", 0)) in p.seeds
            and (source[r["method"]] == name if r["method"] in source else name in p.files)]
    s, picked, unpaired = _score(p, rows, root)
    if p.select_from is not None:
        out["chosen"] = picked
    if s is None:
        return {**out, "status": "missing", "absent": []}
    o = s["overall"]
    peft = sum(1 for r in rows if variant(r) == 0.0)
    # the mean change of each task × method cell: where the average's points are lost
    by_cell = summarise(rows, group=lambda r: f"{r['task']}/{r['method']}" if variant(r) == picked.get(r["task"]) else None)
    cells = {k: v["overall"]["metric_delta"] for k, v in by_cell.items()}
    complete = o["pairs"] == peft and sorted(s["seeds"]) == sorted(p.seeds) and not unpaired
    # prompt-tuning rows measured before the fix: their density counted the 60 virtual tokens
    virtual = sum(1 for r in rows if r.get("density_counts_virtual_tokens"))
    return {
        **out, "status": "ok" if complete else "incomplete", "seeds": sorted(s["seeds"]), "pairs": o["pairs"],
        "peft_runs": peft, "density_reduction_pct": o["density_reduction_pct"], "metric_delta": o["metric_delta"],
        "metric_delta_se": o["metric_delta_se"],  # over seeds (deftune.compare.pairs.summarise)
        "hardware": sorted({_hardware(d) for d in data}),
        "meets_density": o["density_reduction_pct"] >= 40, "meets_metric": o["metric_delta"] >= -1,
        "cells": dict(sorted(cells.items(), key=lambda kv: kv[1])),
        # leave one method out: how much the verdict rests on one method
        "without": {m: _pool([v for k, v in s["methods"].items() if k != m]) for m in s["methods"]},
        "vs_plain_peft": _vs_plain(p, rows, data, root),
        "rows_counting_virtual_tokens": virtual,
    }


def _score(p: Protocol, rows: list[dict[str, Any]], root: Path
           ) -> tuple[dict[str, Any] | None, dict[str, float | str], int | None]:
    """``(summary, variant chosen per task, unpaired runs at the choice)`` of a protocol's rows: its
    fixed variant, or α chosen per task on ``select_from`` (``unpaired`` None for a fixed variant)."""
    if p.select_from is None:
        return summarise(rows).get(p.key), {r["task"]: p.key for r in rows}, None
    choices = select_alphas(load_rows(root / p.select_from), p.tolerance, set(p.seeds))
    choices = {t: c for t, c in choices.items() if t in {r["task"] for r in rows}}
    picked: dict[str, float | str] = {t: c.alpha for t, c in sorted(choices.items())}
    return selected_summary(rows, choices), picked, len(missing_at_choice(rows, choices))


def _vs_plain(p: Protocol, rows: list[dict[str, Any]], data: list[Any], root: Path) -> dict[str, Any] | None:
    """The protocol against dense PEFT *without* learned activation scales (``PLAIN``): each dense
    PEFT run is replaced by the plain run of the same task, method, seed, steps, eval split and
    recipe (learning rate, method options; all but the scales); a protocol whose dense runs carry no
    scales is its own plain baseline. A method taken from its own file (``method_files``) takes its
    plain twins from that file. A per-task protocol keeps the α chosen on ``select_from``.
    None where that baseline does not exist for every pair: a file
    recorded on another GPU (or the CPU; the files' hardware records), other steps, seeds or
    recipes (e.g. a method file whose recipe no plain run shares)."""
    own = {m: f for f, methods in p.method_files for m in methods}
    dense = [r for r in rows if variant(r) == 0.0]
    if dense and all(recipe(r)["act_scale"] == "none" for r in dense):
        twins = dense  # the protocol's own dense runs are plain PEFT already (e.g. a budget no PLAIN run has)
    else:
        plain = _plain_runs(data, root)
        if plain is not None and own:  # a method from its own file: its plain twins from there (REAL_PROMPT: all three)
            plain = {k: v for k, v in plain.items() if k[1] not in own}
            for m, f in own.items():
                for name in REAL_PROMPT if f in REAL_PROMPT else (f,):
                    plain |= {_twin_key(r): r for r in read_json(root / name)["runs"] if r["method"] == m
                              and variant(r) == 0.0 and recipe(r)["act_scale"] == "none"}
        if plain is None or not dense or any(_twin_key(r) not in plain for r in dense):
            return None
        twins = [plain[_twin_key(r)] for r in dense]
    s, _, _ = _score(p, [r for r in rows if variant(r) != 0.0] + twins, root)
    if s is None:
        return None
    o = s["overall"]
    return {k: o[k] for k in ("pairs", "density_reduction_pct", "metric_delta", "metric_delta_se")}


def _twin_key(r: dict[str, Any]) -> tuple:
    """What a dense run and its plain twin share: task, method, seed, steps, eval split and the
    recipe but the activation scales (``act_scale``, their learning rate and which losses move them)."""
    rest = {k: v for k, v in recipe(r).items() if k not in ("act_scale", "scale_lr")}
    rest["method_options"] = {k: v for k, v in rest["method_options"].items() if k != "act_scale_grad"}
    return (r["task"], r["method"], int(r.get("seed", 0)), int(r["steps"]), r.get("eval_split", "dev"),
            json.dumps(rest, sort_keys=True))


def _plain_runs(data: list[Any], root: Path) -> dict[tuple, dict[str, Any]] | None:
    """The dense PEFT runs without learned scales of ``PLAIN`` by :func:`_twin_key`; None when the
    file is missing or was recorded on another GPU (or the CPU) than the files ``data``."""
    path = root / PLAIN
    if not path.is_file():
        return None
    plain_data = read_json(path)
    if {_hardware(d) for d in data} != {_hardware(plain_data)}:
        return None
    return {_twin_key(r): r for r in plain_data["runs"] if variant(r) == 0.0 and recipe(r)["act_scale"] == "none"}


@dataclass(frozen=True)
class Baseline:
    """Dense PEFT runs with learned scales, scored against plain PEFT (``PLAIN``): what the scales
    cost a run that has no density loss. ``files`` and ``seeds`` as in :class:`Protocol`."""

    id: str
    label: str
    files: tuple[str, ...]
    seeds: tuple[int, ...]


BASELINES = (
    Baseline("scales-lr0.1", "learned scales, lr 0.1 (the recipe's)", (R + "glue.json", R + "glue_seeds5_9.json"),
             S04 + S59),
    Baseline("scales-lr0.01", "learned scales, lr 0.01 (exploratory)", (R + "glue_scale_lr001.json",), (0, 1)),
)


def baseline_gap(b: Baseline, root: Path = ROOT) -> dict[str, Any]:
    """Mean metric of the scaled dense runs minus their plain twins (points), overall (with the SE
    over seeds), per task and per method. ``status``: ``ok``; ``incomplete`` when a run has no twin
    or an asked seed no runs; ``missing`` without files or twins; ``other hardware`` when the plain
    file was recorded elsewhere."""
    files = [root / f for f in b.files]
    out: dict[str, Any] = {"id": b.id, "label": b.label, "files": list(b.files)}
    if not all(f.is_file() for f in files):
        return {**out, "status": "missing"}
    data = [read_json(f) for f in files]
    plain = _plain_runs(data, root)
    if plain is None:  # no plain file, or one recorded on other hardware: no like-for-like twins
        return {**out, "status": "missing" if not (root / PLAIN).is_file() else "other hardware"}
    scaled = [r for d in data for r in d["runs"] if variant(r) == 0.0 and recipe(r)["act_scale"] != "none"
              and int(r.get("seed", 0)) in b.seeds]
    diffs = [(r, r["metric"]["value"] - plain[_twin_key(r)]["metric"]["value"]) for r in scaled if _twin_key(r) in plain]
    if not diffs:
        return {**out, "status": "missing"}

    def mean_by(group: Callable[[dict[str, Any]], Any]) -> dict[Any, float]:
        groups: dict[Any, list[float]] = {}
        for r, d in diffs:
            groups.setdefault(group(r), []).append(d)
        return {k: fmean(v) for k, v in sorted(groups.items())}

    seeds = mean_by(lambda r: int(r.get("seed", 0)))
    complete = len(diffs) == len(scaled) and sorted(seeds) == sorted(b.seeds)  # every run paired, every seed there
    return {**out, "status": "ok" if complete else "incomplete", "pairs": len(diffs),
            "seeds": sorted(seeds), "metric_delta": fmean(d for _, d in diffs),
            "metric_delta_se": stdev(seeds.values()) / len(seeds) ** 0.5 if len(seeds) > 1 else None,
            "tasks": mean_by(lambda r: r["task"]), "methods": mean_by(lambda r: r["method"])}


def _format_seeds(seeds: list[int]) -> str:
    if len(seeds) > 1 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}–{seeds[-1]}"
    return ", ".join(map(str, seeds))


def _verdict(r: dict[str, Any]) -> str:
    if r["status"] == "incomplete":
        return f"incomplete ({r['pairs']} of {r['peft_runs']} pairs)"
    if r["meets_density"] and r["meets_metric"]:
        return "met"
    return "missed (" + " and ".join(k for k, ok in (("density", r["meets_density"]), ("metric", r["meets_metric"]))
                                     if not ok) + ")"


def _without(r: dict[str, Any]) -> str:
    w = r["without"].get(LEFT_OUT)
    return "–" if w is None else f"{density_change(w['density_reduction_pct'])} % / {w['metric_delta']:+.2f}"


def _plain(r: dict[str, Any]) -> str:
    v = r.get("vs_plain_peft")
    return "–" if v is None else f"{density_change(v['density_reduction_pct'])} % / {v['metric_delta']:+.2f}"


def table_lines(results: list[dict[str, Any]]) -> list[str]:
    """The markdown table of :func:`evaluate` results, one row per protocol."""
    lines = ["| variant | how it was chosen | seeds | pairs | density | metric (points) | SE | target | "
             f"without {LEFT_OUT} tuning | vs PEFT without learned scales | hardware |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r["status"] == "missing":
            lines.append(f"| {r['label']} | {r['how']} | – | 0 | – | – | – | missing ({', '.join(r['absent']) or 'no pairs'}) | | | |")
            continue
        label = r["label"] + (" (" + ", ".join(f"{t} {a:g}" for t, a in r["chosen"].items()) + ")" if "chosen" in r else "")
        se = f"{r['metric_delta_se']:.2f}" if r["metric_delta_se"] is not None else "–"
        if r.get("rows_counting_virtual_tokens"):
            label += " †"
        lines.append(f"| {label} | {r['how']} | {_format_seeds(r['seeds'])} | {r['pairs']} | {density_change(r['density_reduction_pct'])} % | "
                     f"{r['metric_delta']:+.2f} | {se} | {_verdict(r)} | {_without(r)} | {_plain(r)} | {', '.join(r['hardware'])} |")
    return lines


def glance_span(lines: list[str]) -> tuple[int, int]:
    """``(start, stop)`` of the table under the "At a glance" bullet of a markdown file's lines (the
    first run of lines starting ``"  |"`` after the line starting with :data:`GLANCE`, before the
    next bullet or heading)."""
    head = next((i for i, line in enumerate(lines) if line.startswith(GLANCE)), None)
    start = None
    if head is not None:
        for i in range(head + 1, len(lines)):
            if lines[i].startswith(("* ", "#")):
                break
            if lines[i].startswith(INDENT + "|"):
                start = i
                break
    if start is None:
        raise ValueError(f"no table under a line starting {GLANCE!r} (indented {len(INDENT)} spaces) to update")
    stop = start
    while stop < len(lines) and lines[stop].startswith(INDENT + "|"):
        stop += 1
    return start, stop


def update_markdown(path: str | Path, table: list[str]) -> None:
    """Replace the "At a glance" table of ``path`` with ``table`` (atomically; the rest is kept)."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").split("\n")
    start, stop = glance_span(lines)
    lines[start:stop] = [INDENT + line for line in table]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    tmp.replace(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / R / "glue_protocols.json"), help="JSON output")
    ap.add_argument("--update-md", metavar="MD", help="also replace the \"At a glance\" table of this markdown "
                    "file (docs/results.md) with the recomputed one")
    args = ap.parse_args()
    results = [evaluate(p) for p in PROTOCOLS]
    table = table_lines(results)
    print("\n".join(table))
    print("\nWhere the points go — the two task/method cells that lose most (mean change over seeds; each "
          "cell weighs 1/cells of the average):")
    for r in results:
        if r["status"] != "missing":
            worst = "; ".join(f"{k} {v:+.2f}" for k, v in list(r["cells"].items())[:2])
            print(f"* {r['id']} ({len(r['cells'])} cells): {worst}")
    gaps = [baseline_gap(b) for b in BASELINES]
    print("\nDense PEFT with learned scales minus plain PEFT (points; the baseline of the last column):")
    for g in gaps:
        if g["status"] in ("missing", "other hardware"):
            print(f"* {g['label']}: {g['status']}")
            continue
        se = "" if g["metric_delta_se"] is None else f" (SE {g['metric_delta_se']:.2f})"
        tasks = ", ".join(f"{t} {v:+.2f}" for t, v in g["tasks"].items())
        print(f"* {g['label']}, seeds {_format_seeds(g['seeds'])}, {g['pairs']} pairs: {g['metric_delta']:+.2f}{se}; {tasks}")
    write_json_atomic(args.out, {"note": "recomputed from the results files by benchmarks/glue_protocols.py",
                                 "protocols": results, "baselines": gaps})
    print(f"wrote {args.out}")
    if args.update_md:
        update_markdown(args.update_md, table)
        print(f"updated the At a glance table of {args.update_md}")


if __name__ == "__main__":
    main()
