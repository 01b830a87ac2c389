"""The report of a compare grid: the markdown table, the per-α sections of its DEFT-vs-PEFT pairs
(:mod:`deftune.compare.pairs`) and the metric-vs-density plot (:func:`write_compare_report`)."""

from __future__ import annotations

import os
from pathlib import Path
from statistics import fmean
from typing import Any

from deftune.compare.grid import (
    SQUAD,
    CompareConfig,
    check_one_budget,
    format_method_options,
    load_rows,
    recipe,
    run_key,
)
from deftune.compare.pairs import sample_sd, summarise, summary_lines, variant, variant_label, variant_order
from deftune.runs import atomic_path, read_json, write_text_atomic

NOTES_MARKER = "<!-- notes: kept when the report is rewritten -->"
# a hand-written summary between these two lines is kept right under the title on a rewrite
SUMMARY_MARKERS = ("<!-- summary: kept when the report is rewritten -->", "<!-- /summary -->")


def _scales_line(config: CompareConfig) -> str:
    """How the grid's runs carry learned activation scales (``act_scale`` / ``peft_act_scale``)."""
    def scales(value: str, name: str) -> str:
        if value == "none":
            return f"no learned activation scales (`{name}=none`"
        if config.scale_grad == "density":
            return (f"learned activation scales `{name}={value}` moved by the density loss only "
                    f"(`scale_grad=density`, SGD lr {config.scale_lr:g}")
        return f"learned activation scales `{name}={value}` (lr {config.scale_lr:g}"

    peft = config.peft_act_scale
    if peft is None or peft == config.act_scale:
        return scales(config.act_scale, "act_scale") + ", in PEFT and DEFT runs alike)"
    others = "the DEFT and threshold runs" if config.threshold_densities else "the DEFT runs"
    return (scales(config.act_scale, "act_scale") + f", in {others}); the dense PEFT runs: "
            + scales(peft, "peft_act_scale") + ")")


def _grid_of(rows: list[dict[str, Any]], config) -> dict[str, list]:
    """Tasks, methods, α, seeds and threshold densities of the runs the report shows (for its
    Reproduce line: a ``--report-only`` call may name fewer); the config's where there are none."""
    if not rows:
        return {"tasks": list(config.tasks), "methods": list(config.methods), "alphas": list(config.alphas),
                "seeds": list(config.seeds), "densities": list(config.threshold_densities)}
    dense = [r for r in rows if r.get("act_threshold_density") is None]
    return {"tasks": list(dict.fromkeys(r["task"] for r in rows)),
            "methods": list(dict.fromkeys(r["method"] for r in rows)),
            "alphas": sorted({float(r["alpha"]) for r in dense} | ({0.0} if len(dense) < len(rows) else set())),
            "seeds": sorted({int(r.get("seed", 0)) for r in rows}),
            "densities": sorted({float(r["act_threshold_density"]) for r in rows
                                 if r.get("act_threshold_density") is not None})}


def write_compare_report(rows: list[dict[str, Any]], config: CompareConfig) -> None:
    """``docs/results.md``: the seed-averaged table, per-α averages, and a metric-vs-density plot."""
    from deftune.hardware import describe_line

    check_one_budget(rows, config.results_json)
    seen: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        if (other := seen.setdefault(run_key(r), r)) is not r:
            raise ValueError(
                f"{config.results_json} holds two runs under one key {run_key(r)} (recipes {recipe(other)} and "
                f"{recipe(r)}): a report pools one recipe; split the file per recipe"
            )
    recorded = read_json(config.results_json).get("hardware") if Path(config.results_json).is_file() else None

    md = Path(config.report_md)
    img = md.parent / "img" / f"{md.stem}_metric_vs_density.png"  # one figure per report
    plot_metric_vs_density(rows, img)
    seeds_seen = sorted({int(r.get("seed", 0)) for r in rows})
    grid = _grid_of(rows, config)
    has_squad = any(r["task"] == SQUAD for r in rows)
    has_glue = any(r["task"] != SQUAD for r in rows) or not rows
    title = {(True, False): "GLUE: PEFT vs DEFT, every method", (False, True): "SQuAD (generative QA): PEFT vs DEFT"}
    model = "MiniLM (all-MiniLM-L6-v2)" if config.model == "minilm" else f"`{config.model}`"
    glue_lines = [
        f"{model}, {config.steps} steps × batch {config.batch_size}, train subset "
        f"{config.train_subset}, max length {config.max_length}, α schedule `{config.schedule}` "
        f"(warm-up {config.warmup_steps}); "
        + (f"metric on {config.holdout} training examples held out of training (not the dev set)" if config.holdout
           else f"dev metric on {config.eval_subset} dev examples (a fixed draw)" if config.eval_subset
           else "dev metric on the full dev set") + "; exact density in fp32 over real tokens.",
        "DEFT recipe for every method: " + _scales_line(config) + f", head lr {config.head_lr}, method lr "
        "from `METHOD_LR`" + "".join(f", {m} lr {lr:g}" for m, lr in sorted(config.method_lr.items()))
        + "".join(f", {m} {k}={v}" for m, o in sorted(config.method_options.items()) for k, v in o.items())
        + "; regression heads start at the mean training label"
        + (f"; the threshold runs ramp their thresholds in over the first {config.threshold_ramp} steps"
           if config.threshold_ramp else "")
        + (f"; the DEFT runs' density loss stops at density target {config.density_target:g} per layer "
           "(hinge max(0, ρ̃_l − target))" if config.density_target is not None else "") + ".",
    ]
    # dense runs whose scales only the density loss moves are plain PEFT exactly: not a weaker baseline
    scaled = sorted({r.get("act_scale", "none") for r in rows if r["task"] != SQUAD and variant(r) == 0.0
                     and r.get("method_options", {}).get("act_scale_grad") != "density"} - {"none"})
    if scaled:
        glue_lines.append(
            f"Baseline: the dense PEFT runs here carry learned activation scales (`act_scale={', '.join(scaled)}`); "
            "on the MiniLM GLUE grid such runs score below plain PEFT (`docs/results_plain_peft.md`), so the "
            "metric changes below are against a weaker baseline than plain PEFT. `--peft-act-scale none` runs the "
            "baseline without them."
        )
    squad_lines = [
        f"SQuAD rows: `{config.generative_model}`, {config.steps} steps, held-out articles of the SQuAD v1.1 dev file, "
        "greedy decoding, metric F1 (EM in the JSON), exact density of the teacher-forced pass; GenConfig options "
        f"{config.generative_options or 'default'}.",
    ]
    lines = [
        f"# {title.get((has_glue, has_squad), 'PEFT vs DEFT, every method')}",
        "",
        *(glue_lines if has_glue else []),
        *(squad_lines if has_squad else []),
        f"Hardware: {describe_line(recorded if isinstance(recorded, dict) else None)}.",
        f"Seeds in the results file: {', '.join(map(str, seeds_seen))}; every number below is a mean over "
        "the seeds that row has (column `seeds`; each run is a row of the JSON file).",
        "",
        "Reproduce: `deftune compare --tasks " + ",".join(grid["tasks"]) + " --methods " + ",".join(grid["methods"])
        + " --alphas " + ",".join(f"{a:g}" for a in grid["alphas"])
        + " --seeds " + ",".join(map(str, grid["seeds"]))
        + (" --threshold-densities " + ",".join(f"{d:g}" for d in grid["densities"])
           if grid["densities"] else "") + (" --data-dir ../shared/data/glue" if has_glue else "")
        + "".join(f" --{name.replace('_', '-')} {getattr(config, name)}"
                  for name in ("steps", "warmup_steps", "schedule", "train_subset", "eval_subset", "batch_size",
                               "max_length", "model", "act_scale", "peft_act_scale", "scale_lr", "scale_grad", "threshold_ramp", "density_target", "head_lr", "results_json", "report_md",
                               "runs_dir", "generative_model", "squad_dir", "holdout", "select_alpha_from",
                               "select_tolerance")
                  if getattr(config, name) != getattr(CompareConfig, name))
        + (" --generative-options " + ",".join(f"{k}={v}" for k, v in config.generative_options.items())
           if config.generative_options else "")
        + (" --method-lr " + ",".join(f"{m}={lr:g}" for m, lr in config.method_lr.items()) if config.method_lr else "")
        + (" --method-options " + format_method_options(config.method_options) if config.method_options else "") + "`",
        "",
        "| task | method | α | seeds | metric | mean | sd | exact density | trainable params | train s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, str, float | str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["method"], variant(r)), []).append(r)
    for (task, method, v), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], variant_order(kv[0][2]))):
        values = [r["metric"]["value"] for r in rs]
        shown = f"{v:g}" if isinstance(v, float) else f"0 + thresholds {v[1:]}"
        lines.append(
            f"| {task} | {method} | {shown} | {len(rs)} | {rs[0]['metric']['name']} | {fmean(values):.2f} | "
            f"{sample_sd(values):.2f} | {fmean([r['density'] for r in rs]):.4f} | {rs[0]['trainable_parameters']:,} | "
            f"{fmean([r['train_seconds'] for r in rs]):.0f} |"
        )
    for v, summary in summarise(rows).items():
        route = "DEFT" if isinstance(v, float) else "threshold route"
        lines += summary_lines(f"{variant_label(v)}: {route} vs PEFT, averaged over tasks and seeds", summary)
    if config.select_alpha_from:
        from deftune.compare.select_alpha import selection_lines

        lines += selection_lines(rows, load_rows(config.select_alpha_from), config.select_alpha_from,
                                 config.select_tolerance)
    lines += ["", f"![metric vs density]({img.relative_to(md.parent).as_posix()})", ""]
    if md.is_file():  # a hand-written summary under the title and notes below the marker survive a rewrite
        old = md.read_text(encoding="utf-8")
        start, end = SUMMARY_MARKERS
        head = old.split(NOTES_MARKER, 1)[0]
        if start in head:
            if end not in head.split(start, 1)[1]:
                raise ValueError(f"{md}: the summary block opened by {start} is not closed by {end} before the "
                                 "notes; close it, or this rewrite would drop it (the file is unchanged)")
            lines[2:2] = [start + head.split(start, 1)[1].split(end, 1)[0] + end, ""]
        if NOTES_MARKER in old:
            lines += [NOTES_MARKER + old.split(NOTES_MARKER, 1)[1]]
    write_text_atomic(md, "\n".join(lines))


def plot_metric_vs_density(rows: list[dict[str, Any]], path: Path) -> None:
    """One panel per task; one point per (method, α), the mean over seeds: colour = method, marker = α."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    tasks = sorted({r["task"] for r in rows})
    methods = sorted({r["method"] for r in rows})
    alphas = sorted({variant(r) for r in rows}, key=variant_order)  # each α, then each threshold density
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    markers = {a: "osD^vP*X"[i % 8] for i, a in enumerate(alphas)}
    fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(4 * max(1, len(tasks)), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for method in methods:
            for alpha in alphas:
                rs = [r for r in rows if r["task"] == task and r["method"] == method and variant(r) == alpha]
                if rs:
                    ax.scatter(fmean([r["density"] for r in rs]), fmean([r["metric"]["value"] for r in rs]),
                               color=colours[method], marker=markers[alpha], s=28)
        ax.set_title(task)
        ax.set_xlabel("exact density")
        ax.set_ylabel("dev metric (mean over seeds)")
    handles = [Line2D([], [], color=c, marker="o", ls="", label=m) for m, c in colours.items()]
    handles += [Line2D([], [], color="k", marker=mk, ls="", label=variant_label(a).replace(" = ", "="))
                for a, mk in markers.items()]
    axes[0][-1].legend(handles=handles, fontsize=6, loc="best")
    fig.tight_layout()
    save_figure(fig, path)


def save_figure(fig, path: Path) -> None:
    """Write a matplotlib figure atomically (temp file beside it, then rename) and close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
