"""Sweep results: the JSON file (merged, written atomically), Markdown tables and PNG plots."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path


def command_line() -> str:
    import sys

    return " ".join(["deftune" if sys.argv[0].endswith("deftune") else sys.argv[0], *sys.argv[1:]])


def make_section(config, data, baseline: float, points: list, start: float, *, finished: bool = True) -> dict:
    """A results section; ``finished=False`` for a partial save (the invocation is recorded once, when
    the sweep ends)."""
    from deftune.hardware import describe_line

    invocation = {
        "command": command_line(),
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()},
        "wall_seconds": time.perf_counter() - start,
        "points": len(points),
    }
    return {
        "run_dir": data.run_dir, "task": data.task.name, "metric_name": data.task.metrics[0],
        "dev_examples": sum(len(b["input_ids"]) for b in data.dev), "baseline": baseline,
        "hardware": describe_line(), "invocations": [invocation] if finished else [], "points": points,
    }


def merge_results(path: str, name: str, section: dict, key: tuple[str, ...]) -> dict:
    """Merge ``section`` into the JSON at ``path`` under ``name``: points with the same ``key`` fields
    are replaced, others kept, invocations appended (so several sweeps of the same run add up)."""
    from deftune.runs import file_lock, read_json, write_json_atomic

    target = Path(path)
    with file_lock(target.with_name(f".{target.name}.lock")):  # read-merge-write of concurrent sweeps
        data = read_json(path) if target.is_file() else {}
        old = data.get(name, {})
        if old and old.get("run_dir") == section["run_dir"]:
            new_keys = {tuple(p.get(f) for f in key) for p in section["points"]}
            kept = [p for p in old.get("points", []) if tuple(p.get(f) for f in key) not in new_keys]
            section = {**section, "points": kept + section["points"],
                       "invocations": old.get("invocations", []) + section["invocations"]}
        data[name] = section
        write_json_atomic(path, data)
    return data


def markdown_table(section: dict) -> str:
    """The points of one results section as a Markdown table (for docs)."""
    quant = "bits" in (section["points"][0] if section["points"] else {})
    head = ["pattern", "method", section["metric_name"], "Δ vs fp32"]
    head += ["mean out-err", "packed/fp32 bytes", "s"] if quant else ["sparsity", "mean out-err", "s"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = sorted(section["points"], key=lambda p: (p["pattern"].split(":")[0], str(p.get("granularity", "")),
                                                       p.get("bits", 0), p.get("level") or 0, p["pattern"], p["method"]))
    for p in order:
        err = p.get("mean_output_rel_error")
        cells = [f"`{p['pattern']}`", p["method"], f"{p['metric']:.2f}", f"{p['delta']:+.2f}"]
        if quant:
            packed = p.get("packed")
            cells += ["-" if err is None else f"{err:.4f}", "-" if not packed else f"{packed['ratio']:.3f}"]
        else:
            cells += [f"{p['sparsity']:.3f}", "-" if err is None else f"{err:.4f}"]
        cells.append(f"{p['seconds']:.0f}")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_STYLES = {"rtn": ("--", "o"), "oneshot": ("--", "o"), "gptq": ("-", "s"), "mse": ("-.", "^"),
           "qat": ("-", "D"), "recovery": ("-", "D"), "gmp": (":", "v"), "rigl": (":", "P")}


def _plot(section: dict, path: str, series: dict[tuple[str, str], list], xlabel: str, title: str, ref: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.0, 4.4))
    groups = sorted({g for g, _ in series})
    colors = {g: plt.get_cmap("tab10")(i % 10) for i, g in enumerate(groups)}
    for (group, method), pts in sorted(series.items()):
        pts.sort()
        style, marker = _STYLES.get(method, ("-", "o"))
        ax.plot([x for x, _ in pts], [y for _, y in pts], linestyle=style, marker=marker, color=colors[group],
                label=f"{group} {method}")
    ax.axhline(section["baseline"], color="gray", linestyle=":", label=ref)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{section['task']} dev {section['metric_name']}")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_quant(section: dict, path: str) -> None:
    """Metric against bits; one colour per granularity/symmetry, one line style per method."""
    series: dict[tuple[str, str], list] = {}
    for p in section["points"]:
        group = p["pattern"].split(":", 1)[1]  # e.g. g128:sym
        series.setdefault((group, p["method"]), []).append((p["bits"], p["metric"]))
    _plot(section, path, series, "weight bits", "Weight quantization of the block Linear layers", "fp32")


def plot_sparsity(section: dict, path: str) -> None:
    """Metric against measured sparsity; one colour per structure, one line style per method."""
    series: dict[tuple[str, str], list] = {}
    for p in section["points"]:
        series.setdefault((p["structure"], p["method"]), []).append((p["sparsity"], p["metric"]))
    _plot(section, path, series, "weight sparsity of the block Linear layers",
          "Weight sparsity: one-shot vs recovery fine-tuning", "dense")


def _save(fig, path: str) -> None:
    import os
    import tempfile

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=Path(path).parent, suffix=".png")
    os.close(fd)
    fig.tight_layout()
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
    import matplotlib.pyplot as plt

    plt.close(fig)


__all__ = ["command_line", "make_section", "markdown_table", "merge_results", "plot_quant", "plot_sparsity"]
