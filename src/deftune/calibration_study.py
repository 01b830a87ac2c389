"""Threshold calibration studies (``deftune calibrate``): per-layer activation thresholds
(|a| <= t_l -> 0) calibrated to a target density for one or several models, optionally swept over
target densities against the task metric, merged into a results file and plotted.

Data (``CalibrationJob.data``):
  sst2   calibrate on SST-2 train sentences; the metric is accuracy on the SST-2 dev set (needs a run
         directory with a trained head).
  squad  calibrate on SQuAD v1.1 dev paragraphs of the first 24 articles; the metric is perplexity of
         a causal LM on paragraphs of the other 24 articles (split by article, never by question).
         This perplexity is the model's own loss over every real token but the first
         (``exp`` of the mean next-token NLL); :func:`deftune.generative.evaluate.perplexity`, which
         scores QA runs, is computed on other paragraphs with a BOS token, so the two do not compare.

The mechanism is :mod:`deftune.sparse.calibrate`; this module is the experiment around it (it sits
above :mod:`deftune.train`, whose runs it loads).
"""

from __future__ import annotations

import json
import os
import platform
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

DATA_SOURCES = ("sst2", "squad")
SQUAD_ENV = "DEFTUNE_SQUAD_FILE"


@dataclass(frozen=True)
class CalibrationJob:
    """One ``deftune calibrate`` invocation.

    Attributes:
        models: run directories or model names (``minilm``, ``smollm2``, a folder).
        labels: one label per model in results and plots (default: the folder or model name).
        data: ``sst2`` (classification accuracy) or ``squad`` (causal-LM perplexity).
        target: density for ``output`` (the thresholds file of the first model).
        mode: ``layer`` (per-layer target), ``global`` (one threshold for all layers) or ``energy``
            (every layer loses the same fraction of its activation energy).
        site: where the thresholds act: ``act`` (the activation output; for gated MLPs the
            activated gate) or ``product`` (gated MLPs: ``act(gate) * up``, the down projection's input).
        refine_passes: extra calibration passes with thresholds applied (corrects drift in depth).
        output: write the thresholds of the first model at ``target`` here (JSON).
        sweep: target densities to evaluate (empty: no evaluation).
        results: merge the sweep into this JSON file under ``name``.
        plot: write a PNG of metric vs target density here.
        name: key of this experiment in ``results``.
        calib_size: calibration sentences / paragraphs.
        eval_size: evaluation paragraphs (``squad``; SST-2 uses its whole dev set).
        batch_size: batch size of calibration and evaluation passes.
        max_length: maximum tokens per example.
        data_dir: GLUE folder (default ``$DEFTUNE_DATA_DIR``).
        squad_file: SQuAD v1.1 JSON (default ``$DEFTUNE_SQUAD_FILE``, else ``$DEFTUNE_SQUAD_DIR/dev-v1.1.json``, else ``<data_dir>/../squad/dev-v1.1.json``).
        seed: seed of the data subsets.
        threads: torch CPU threads (0: leave torch's default).
    """

    models: tuple[str, ...]
    labels: tuple[str, ...] = ()
    data: str = "sst2"
    target: float = 0.5
    mode: str = "layer"
    site: str = "act"
    refine_passes: int = 2
    output: str | None = None
    sweep: tuple[float, ...] = ()
    results: str | None = None
    plot: str | None = None
    name: str | None = None
    calib_size: int = 256
    eval_size: int = 50
    batch_size: int = 16
    max_length: int = 128
    data_dir: str | None = None
    squad_file: str | None = None
    seed: int = 0
    threads: int = 0

    def __post_init__(self) -> None:
        from deftune.sparse.calibrate import CalibrationConfig

        if not self.models:
            raise ValueError("give at least one --model")
        if self.labels and len(self.labels) != len(self.models):
            raise ValueError(f"{len(self.labels)} --label values for {len(self.models)} --model values")
        if self.data not in DATA_SOURCES:
            raise ValueError(f"data must be one of {DATA_SOURCES}, got {self.data!r}")
        self.calibration_config()  # validates target, mode and refine_passes
        for t in self.sweep:
            CalibrationConfig(target=t)
        for key in ("calib_size", "eval_size", "batch_size", "max_length"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be a positive integer, got {getattr(self, key)!r}")
        if (self.results or self.plot) and not self.sweep:
            raise ValueError("--results and --plot need --sweep target densities")

    def calibration_config(self):
        from deftune.sparse.calibrate import CalibrationConfig

        return CalibrationConfig(target=self.target, mode=self.mode, refine_passes=self.refine_passes, site=self.site)

    @property
    def model_labels(self) -> tuple[str, ...]:
        return self.labels or tuple(Path(m).name or m for m in self.models)


# ---- models and data ---------------------------------------------------------------------------


def is_run_dir(path: str) -> bool:
    from deftune.runs import CONFIG_FILE

    return (Path(path) / CONFIG_FILE).is_file()


def squad_paragraphs(path: str | os.PathLike, part: str, n: int, seed: int = 0) -> list[str]:
    """``n`` context paragraphs of SQuAD v1.1 (a fixed sample): ``part="calib"`` from the first
    half of the articles, ``"eval"`` from the second half (split by article)."""
    from deftune.data.glue import DataError

    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    try:  # only the paragraphs are read: their questions may be missing
        articles = data["data"]
        half = len(articles) // 2
        chosen = articles[:half] if part == "calib" else articles[half:]
        paragraphs = [str(p["context"]) for a in chosen for p in a["paragraphs"]]
    except (KeyError, TypeError) as err:
        raise DataError(f"{path}: not a SQuAD v1.1 file (data -> articles -> paragraphs -> context; "
                        f"missing {err})") from None
    return random.Random(seed).sample(paragraphs, min(n, len(paragraphs)))


def text_batches(texts: list[str], tokenizer, batch_size: int, max_length: int) -> list[dict]:
    """Padded batches with ``labels`` = input ids, -100 on padding (for causal-LM loss)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batches = []
    for start in range(0, len(texts), batch_size):
        enc = dict(tokenizer(texts[start : start + batch_size], padding=True, truncation=True,
                             max_length=max_length, return_tensors="pt"))
        enc["labels"] = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        batches.append(enc)
    return batches


def perplexity(model, batches: list[dict]) -> float:
    """exp(mean next-token NLL) over all real tokens of ``batches``."""
    import math

    import torch

    nll, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            n = int((batch["labels"][:, 1:] != -100).sum())  # predicted tokens (HF shifts labels)
            nll += float(model(**batch).loss) * n
            count += n
    return math.exp(nll / count)


@dataclass
class _Setup:
    model: object
    calib: list[dict]
    evaluate: Callable
    metric: str
    data_info: dict = field(default_factory=dict)
    skip_leading: int = 0  # prompt-tuning virtual tokens: not real tokens, left out of calibration


def _setup(job: CalibrationJob, model_name: str) -> _Setup:
    """Model, calibration batches and evaluation function for one model."""
    if job.data == "sst2":
        from deftune import models
        from deftune.data.glue import get_task, load_glue, make_batches, subsample

        task = get_task("sst2")
        if job.sweep and not is_run_dir(model_name):
            raise ValueError(f"--sweep on sst2 needs a run directory with a trained head, got {model_name!r}")
        if is_run_dir(model_name):
            from deftune.methods import virtual_token_count
            from deftune.train import load_run

            model, tokenizer, _ = load_run(model_name)
            skip = virtual_token_count(model)
        else:
            skip = 0
            model = models.load_for_classification(model_name, task.num_labels)
            tokenizer = models.load_tokenizer(model_name)
        calib_ex = subsample(load_glue(task, "train", job.data_dir), job.calib_size, seed=job.seed)
        calib = make_batches(calib_ex, tokenizer, batch_size=job.batch_size, max_length=job.max_length)
        dev = load_glue(task, "dev", job.data_dir)
        dev_batches = make_batches(dev, tokenizer, batch_size=64, max_length=job.max_length)

        def evaluate(m) -> dict[str, float]:
            from deftune.train import evaluate_batches

            return evaluate_batches(m, dev_batches, task, thresholds=(), zeroed=False).metrics

        info = {"calibration": f"SST-2 train, {len(calib_ex)} sentences (seed {job.seed})",
                "evaluation": f"SST-2 dev, {len(dev)} sentences", "max_length": job.max_length}
        return _Setup(model, calib, evaluate, "accuracy", info, skip_leading=skip)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deftune import models

    path = models.resolve(model_name)[0]
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    from deftune.data.squad import SQUAD_DIR_ENV

    squad = job.squad_file or os.environ.get(SQUAD_ENV)
    if squad is None and os.environ.get(SQUAD_DIR_ENV):  # the folder the other SQuAD commands read
        squad = str(Path(os.environ[SQUAD_DIR_ENV]) / "dev-v1.1.json")
    if squad is None:
        from deftune.data.glue import resolve_data_dir

        root = resolve_data_dir(job.data_dir)
        squad = str(root.parent / "squad" / "dev-v1.1.json") if root is not None else None
    if squad is None or not Path(squad).is_file():
        raise FileNotFoundError(f"SQuAD file {squad!r} not found; pass --squad-file, or set {SQUAD_ENV} (a file) or "
                                f"{SQUAD_DIR_ENV} (a folder holding dev-v1.1.json)")
    calib = text_batches(squad_paragraphs(squad, "calib", job.calib_size, job.seed), tokenizer,
                         job.batch_size, job.max_length)
    eval_batches = text_batches(squad_paragraphs(squad, "eval", job.eval_size, job.seed), tokenizer,
                                job.batch_size, job.max_length)
    info = {"calibration": f"SQuAD v1.1 dev, articles 0-23, {job.calib_size} paragraphs (seed {job.seed})",
            "evaluation": f"SQuAD v1.1 dev, articles 24-47, {job.eval_size} paragraphs (seed {job.seed})",
            "max_length": job.max_length}
    return _Setup(model, calib, lambda m: {"perplexity": perplexity(m, eval_batches)}, "perplexity", info)


# ---- the job -----------------------------------------------------------------------------------


def run_calibration(job: CalibrationJob) -> dict:
    """Calibrate (and sweep) every model of ``job``; write the requested files; return the record."""
    import torch

    from deftune.sparse.calibrate import calibrate_thresholds, collect_histograms, sweep_targets

    if job.threads:
        torch.set_num_threads(job.threads)
    record: dict = {"data": job.data, "mode": job.mode, "site": job.site, "models": {}}
    for model_name, label in zip(job.models, job.model_labels):
        setup = _setup(job, model_name)
        config = job.calibration_config()
        start = time.perf_counter()
        hist = collect_histograms(setup.model, setup.calib, config, skip_leading=setup.skip_leading)
        entry: dict = {"model": model_name, "histogram_seconds": round(time.perf_counter() - start, 2),
                       "refine_passes": job.refine_passes, "points": []}
        if job.output or not job.sweep:  # the sweep calibrates its own targets
            th = calibrate_thresholds(setup.model, setup.calib, config, histogram=hist, skip_leading=setup.skip_leading)
            print(f"{label}: calibrated in {time.perf_counter() - start:.1f}s\n{th.table()}")
            if job.output and model_name == job.models[0]:
                th.save(job.output)
        if job.sweep:
            points = sweep_targets(setup.model, setup.calib, job.sweep, setup.evaluate, config, histogram=hist,
                                   skip_leading=setup.skip_leading)
            for point in points:
                print(f"{label}: target {point.target:.2f}  calib {point.calibration_density:.4f}  "
                      f"eval {point.eval_density:.4f}  {setup.metric} {point.metrics[setup.metric]:.3f}")
                entry["points"].append(asdict(point))
        entry["data"] = setup.data_info
        record["models"][label] = entry
        record["metric"] = setup.metric
        del setup
    if job.results:
        _merge_results(job, record)
    if job.plot:
        plot_sweep(record, job.plot, title=job.name or job.data)
    return record


def _merge_results(job: CalibrationJob, record: dict) -> None:
    import torch

    from deftune.runs import write_json_atomic

    path = Path(job.results)  # type: ignore[arg-type]
    data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"experiments": {}}
    record = dict(record)
    record["command"] = "deftune calibrate " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["calibrate"] else None
    record["hardware"] = f"{platform.machine()} CPU, torch {torch.__version__}, {torch.get_num_threads()} thread(s)"
    data["experiments"][job.name or f"{job.data}-{'-'.join(job.model_labels)}"] = record
    write_json_atomic(path, data)


def plot_sweep(record: dict, path: str | os.PathLike, title: str = "") -> None:
    """Metric vs the density measured on the evaluation data (left; one point per target) and
    measured vs target density (right). ``record``: one experiment of the results JSON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = record["metric"]
    fig, (ax_m, ax_d) = plt.subplots(1, 2, figsize=(10, 4))
    for label, entry in record["models"].items():
        pts = entry["points"]
        targets = [p["target"] for p in pts]
        ax_m.plot([p["eval_density"] for p in pts], [p["metrics"][metric] for p in pts], "o-", label=label)
        ax_d.plot(targets, [p["eval_density"] for p in pts], "o-", label=label)
    ax_d.plot([0, 1], [0, 1], "k:", lw=1, label="target")
    ax_m.set(xlabel="measured density on evaluation data (exact non-zeros)", ylabel=metric, title=title)
    ax_d.set(xlabel="target density", ylabel="measured density (evaluation data)", title="calibration fidelity")
    if metric == "perplexity":
        ax_m.set_yscale("log")
    for ax in (ax_m, ax_d):
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
