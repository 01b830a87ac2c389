"""Datasets (GLUE, SQuAD) and locally computed metrics."""

from deftune.data.glue import (
    DATA_DIR_ENV,
    GLUE_TASKS,
    DataError,
    Example,
    GlueTask,
    get_task,
    load_glue,
    load_split,
    make_batches,
    split_holdout,
    subsample,
)
from deftune.data.metrics import METRICS, compute_metrics

__all__ = [
    "DATA_DIR_ENV",
    "GLUE_TASKS",
    "METRICS",
    "DataError",
    "Example",
    "GlueTask",
    "compute_metrics",
    "get_task",
    "load_glue",
    "load_split",
    "make_batches",
    "split_holdout",
    "subsample",
]
