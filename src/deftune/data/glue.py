"""GLUE tasks from a local GLUE-format folder, or from the Hugging Face Hub.

A local folder holds one sub-folder per task in the original GLUE layout (``SST-2/train.tsv``,
``SST-2/dev.tsv``, ``CoLA/…``). Point deftune at it with ``--data-dir`` or the environment variable
``DEFTUNE_DATA_DIR``. Files are UTF-8 TSV read without quote processing (``csv.QUOTE_NONE``);
MRPC's UTF-8 BOM is stripped. With no folder, tasks are loaded from the Hub through the optional
``datasets`` dependency (``pip install deftune[hub]``).
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

DATA_DIR_ENV = "DEFTUNE_DATA_DIR"


class DataError(ValueError):
    """Raised for a missing folder or file, a malformed row, or an empty dataset."""


@dataclass(frozen=True)
class Example:
    """One GLUE example: one or two texts and a label (int class or float score)."""

    text_a: str
    text_b: str | None
    label: float | int


@dataclass(frozen=True)
class GlueTask:
    """How to read one GLUE task.

    Attributes:
        name: short name used on the command line (``sst2``).
        folder: folder name in the GLUE layout (``SST-2``).
        header: whether the TSV has a header row.
        text_cols: column names (or indices without a header) of the one or two texts.
        label_col: label column name or index.
        labels: label strings in class order (``None`` for regression).
        metrics: metric names (:mod:`deftune.data.metrics`); the first is the headline metric.
        hub: (dataset, config) on the Hub.
        hub_text: the Hub dataset's text column names.
        dev_file: the dev split's file in the task folder (MNLI: ``dev_matched.tsv``).
        hub_dev: the dev split's name on the Hub (MNLI: ``validation_matched``).
    """

    name: str
    folder: str
    header: bool
    text_cols: tuple[str | int, ...]
    label_col: str | int
    labels: tuple[str, ...] | None
    metrics: tuple[str, ...]
    hub: tuple[str, str]
    hub_text: tuple[str, ...]
    dev_file: str = "dev.tsv"
    hub_dev: str = "validation"

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    @property
    def is_regression(self) -> bool:
        return self.labels is None


GLUE_TASKS: dict[str, GlueTask] = {
    t.name: t
    for t in (
        GlueTask("sst2", "SST-2", True, ("sentence",), "label", ("0", "1"), ("accuracy",), ("glue", "sst2"), ("sentence",)),
        GlueTask("cola", "CoLA", False, (3,), 1, ("0", "1"), ("matthews", "accuracy"), ("glue", "cola"), ("sentence",)),
        GlueTask(
            "mrpc", "MRPC", True, ("#1 String", "#2 String"), "Quality", ("0", "1"), ("accuracy", "f1"),
            ("glue", "mrpc"), ("sentence1", "sentence2"),
        ),
        GlueTask(
            "rte", "RTE", True, ("sentence1", "sentence2"), "label", ("entailment", "not_entailment"),
            ("accuracy",), ("glue", "rte"), ("sentence1", "sentence2"),
        ),
        GlueTask(
            "stsb", "STS-B", True, ("sentence1", "sentence2"), "score", None, ("pearson", "spearman"),
            ("glue", "stsb"), ("sentence1", "sentence2"),
        ),
        GlueTask(
            "qnli", "QNLI", True, ("question", "sentence"), "label", ("entailment", "not_entailment"),
            ("accuracy",), ("glue", "qnli"), ("question", "sentence"),
        ),
        GlueTask(
            # class order of the Hub's glue/mnli ClassLabel, so both sources give the same ids;
            # dev is the matched dev set
            "mnli", "MNLI", True, ("sentence1", "sentence2"), "gold_label",
            ("entailment", "neutral", "contradiction"), ("accuracy",), ("glue", "mnli"), ("premise", "hypothesis"),
            dev_file="dev_matched.tsv", hub_dev="validation_matched",
        ),
        GlueTask(
            "qqp", "QQP", True, ("question1", "question2"), "is_duplicate", ("0", "1"), ("accuracy", "f1"),
            ("glue", "qqp"), ("question1", "question2"),
        ),
    )
}

SPLITS = ("train", "dev", "validation", "test")  # "validation" is the Hub's name of "dev"


def get_task(name: str) -> GlueTask:
    key = name.lower().replace("-", "")
    if key not in GLUE_TASKS:
        raise DataError(f"unknown GLUE task {name!r}; choose one of {sorted(GLUE_TASKS)}")
    return GLUE_TASKS[key]


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """The GLUE folder from the argument, else ``$DEFTUNE_DATA_DIR``, else ``None`` (use the Hub)."""
    value = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV)
    if value in (None, ""):
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise DataError(
            f"GLUE data folder {str(path)!r}{' (from $' + DATA_DIR_ENV + ')' if data_dir is None else ''} does not "
            "exist; pass --data-dir (or set "
            f"{DATA_DIR_ENV}) to a folder holding task folders such as SST-2/, CoLA/, MRPC/"
        )
    return path


def _parse_label(task: GlueTask, raw: str, where: str) -> float | int:
    raw = raw.strip()
    if task.labels is None:
        try:
            score = float(raw)
        except ValueError:
            raise DataError(f"{where}: score {raw!r} is not a number") from None
        if not math.isfinite(score):
            raise DataError(f"{where}: score {raw!r} is not a finite number")
        return score
    if raw not in task.labels:
        raise DataError(f"{where}: label {raw!r} is not one of {list(task.labels)}")
    return task.labels.index(raw)


def _no_task_file(task: GlueTask, path: Path) -> DataError:
    return DataError(f"task file {str(path)!r} not found; the {task.name} folder must hold train.tsv and "
                     f"{task.dev_file} in GLUE format ({task.folder}/train.tsv)")


def read_glue_tsv(task: GlueTask, path: Path) -> list[Example]:
    """Read one GLUE TSV file; malformed rows raise :class:`DataError` naming file and line."""
    if not path.is_file():
        raise _no_task_file(task, path)
    examples: list[Example] = []
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header: list[str] | None = next(reader, None) if task.header else None
        columns = list(task.text_cols) + [task.label_col]
        if header is not None:
            missing = [c for c in columns if c not in header]
            if missing:
                raise DataError(f"{path}:1: header lacks column(s) {missing}; found {header}")
            index = [header.index(c) for c in columns]  # type: ignore[arg-type]
        else:
            index = [int(c) for c in columns]
        # every row as wide as the header (or, without one, as the columns read): a stray tab inside
        # a sentence would otherwise shift the fields after it silently
        width = len(header) if header is not None else max(index) + 1
        first_line = 2 if header is not None else 1
        for lineno, row in enumerate(reader, start=first_line):
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            where = f"{path}:{lineno}"
            if len(row) != width:
                raise DataError(f"{where}: expected {width} tab-separated fields, got {len(row)} (a tab inside "
                                "a text field?)")
            texts = [row[i] for i in index[:-1]]
            label = _parse_label(task, row[index[-1]], where)
            examples.append(Example(texts[0], texts[1] if len(texts) > 1 else None, label))
    if not examples:
        raise DataError(f"{path} holds no examples (empty dataset)")
    return examples


def _load_from_hub(task: GlueTask, split: str) -> list[Example]:
    try:
        import datasets
    except ImportError:
        raise DataError(
            "no GLUE folder was given and the optional 'datasets' package is missing: pass --data-dir "
            f"(or set {DATA_DIR_ENV}) or install deftune[hub]"
        ) from None
    hub_split = task.hub_dev if split in ("dev", "validation") else split
    ds = datasets.load_dataset(*task.hub, split=hub_split)
    out = []
    for row in ds:
        texts = [row[c] for c in task.hub_text]
        out.append(Example(texts[0], texts[1] if len(texts) > 1 else None, row["label"]))
    if not out:
        raise DataError(f"{task.hub} split {hub_split} is empty")
    return out


def load_glue(
    task: str | GlueTask, split: str = "train", data_dir: str | os.PathLike | None = None
) -> list[Example]:
    """Examples of one GLUE task split (``train`` or ``dev``), local folder first, else the Hub."""
    spec = get_task(task) if isinstance(task, str) else task
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {sorted(SPLITS)}")
    root = resolve_data_dir(data_dir)
    if root is None:
        return _load_from_hub(spec, split)
    return read_glue_tsv(spec, task_file(spec, split, root))


def task_file(spec: GlueTask, split: str, root: Path) -> Path:
    """The TSV of one split of a task in the GLUE folder ``root`` (``DataError`` without the task folder)."""
    folder = root / spec.folder
    if not folder.is_dir():
        raise DataError(
            f"task folder {str(folder)!r} not found in {str(root)!r}; expected GLUE task folders such as "
            f"{', '.join(t.folder for t in list(GLUE_TASKS.values())[:6])}"
        )
    return folder / (spec.dev_file if split in ("dev", "validation") else f"{split}.tsv")


def check_local_tasks(tasks: Sequence[str | GlueTask], data_dir: str | os.PathLike | None) -> None:
    """Raise ``DataError`` unless every task has its train and dev files in the GLUE folder (when
    one is given): checked before a grid trains, not when it reaches the task."""
    root = resolve_data_dir(data_dir) if tasks else None
    if root is not None:
        for task in tasks:
            spec = get_task(task) if isinstance(task, str) else task
            for split in ("train", "dev"):
                if not (path := task_file(spec, split, root)).is_file():
                    raise _no_task_file(spec, path)


def subsample(examples: Sequence[Example], n: int | None, seed: int = 0) -> list[Example]:
    """A fixed random subset of ``n`` examples (all if ``n`` is None or too large)."""
    if n is None or n >= len(examples):
        return list(examples)
    import random

    rng = random.Random(seed)
    return rng.sample(list(examples), n)


# Fixed on purpose: every run, seed, method and α holds out the same examples, so held-out metrics
# are paired across the grid (and never overlap any run's training examples).
HOLDOUT_SEED = 20250225
# The same reasoning for an evaluation subset: every seed of a grid scores the same examples, so
# seed-to-seed differences are training noise, not dev-set sampling.
EVAL_SUBSET_SEED = HOLDOUT_SEED


def split_holdout(examples: Sequence[Example], n: int, seed: int = HOLDOUT_SEED) -> tuple[list[Example], list[Example]]:
    """``(rest, held)``: ``n`` examples drawn from ``examples`` by a fixed seeded draw, and the others.

    Both keep the original order. For choosing hyper-parameters (e.g. α) without looking at the dev
    set: train on ``rest``, score on ``held``.
    """
    if not (isinstance(n, int) and 0 < n < len(examples)):
        raise DataError(f"holdout must be an integer in [1, {len(examples) - 1}] for {len(examples)} training examples, got {n!r}")
    import random

    chosen = set(random.Random(seed).sample(range(len(examples)), n))
    rest = [e for i, e in enumerate(examples) if i not in chosen]
    held = [e for i, e in enumerate(examples) if i in chosen]
    return rest, held


def load_split(
    task: str | GlueTask, split: str, data_dir: str | os.PathLike | None = None, *, holdout: int | None = None
) -> list[Example]:
    """A split as a run sees it: ``train`` (less the held-out examples when ``holdout`` is set),
    ``holdout`` (those ``holdout`` training examples, :func:`split_holdout`) or any split of :func:`load_glue`."""
    if split == "holdout" and not holdout:
        raise DataError("split 'holdout' is the training examples a run held out: this run was not trained "
                        "with --holdout N (holdout=None)")
    if split not in ("train", "holdout", *SPLITS):
        raise DataError(f"unknown split {split!r}; choose one of {[*SPLITS, 'holdout']}")
    if split not in ("train", "holdout") or not holdout:
        return load_glue(task, split, data_dir)
    rest, held = split_holdout(load_glue(task, "train", data_dir), holdout)
    return held if split == "holdout" else rest


def make_batches(
    examples: Sequence[Example],
    tokenizer: Callable,
    *,
    batch_size: int,
    max_length: int = 128,
    shuffle: bool = False,
    seed: int = 0,
    regression: bool = False,
) -> list[dict]:
    """Tokenise ``examples`` into padded batches of model inputs with ``labels``.

    Batches are padded to their own longest sequence (dynamic padding). With ``shuffle`` the order is
    a fixed permutation from ``seed``.
    """
    import random

    import torch

    if not examples:
        raise DataError("cannot make batches from an empty dataset")
    order = list(range(len(examples)))
    if shuffle:
        random.Random(seed).shuffle(order)
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[start : start + batch_size]]
        a = [e.text_a for e in chunk]
        b = [e.text_b for e in chunk] if chunk[0].text_b is not None else None
        enc = tokenizer(a, b, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        dtype = torch.float32 if regression else torch.long
        enc = dict(enc)
        enc["labels"] = torch.tensor([e.label for e in chunk], dtype=dtype)
        batches.append(enc)
    return batches
