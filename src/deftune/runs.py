"""Run directories: what a training run leaves behind (:func:`deftune.train.load_run` loads one back).

A run directory holds

* ``deftune.json`` — the :class:`~deftune.train.TrainConfig` that produced it (with the method
  config) and the deftune version;
* the adapter in the method's own format (PEFT's ``adapter_config.json`` +
  ``adapter_model.safetensors`` for PEFT methods; deftune's for bottleneck adapters / BitFit; the
  whole model for ``full``), written by :func:`deftune.methods.save_adapter`;
* ``extension.safetensors`` — state of training extensions (e.g. ADA-DEFT gates), if any;
* ``results.json`` — the :class:`RunResult`.

deftune's own JSON and safetensors files are written atomically (a unique temp file +
``os.replace``); ``train_log.jsonl`` is appended line by line, and PEFT writes its adapter files
itself. ``results.json`` is written last and marks the run finished; training into a folder
removes an earlier ``results.json`` first, so a run cut short while saving is never taken for a
finished one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CONFIG_FILE = "deftune.json"
RESULTS_FILE = "results.json"
EXTENSION_FILE = "extension.safetensors"
THRESHOLDS_FILE = "act_thresholds.json"  # calibrated activation thresholds of a threshold-route run


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a fresh temp path beside ``path`` (unique per call, so concurrent writers never share
    one); on success it replaces ``path`` in one rename, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be read by others
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_safetensors_atomic(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (name -> contiguous tensor) to ``path`` atomically (temp file, then rename)."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (same-folder temp file, then rename)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` atomically (same-folder temp file, then rename)."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


@contextmanager
def file_lock(path: str | os.PathLike, *, blocking: bool = True) -> Iterator[bool]:
    """An exclusive advisory lock on ``path`` (created if missing); yields whether it was taken.

    ``blocking=False`` yields False at once when another process holds it. The operating system
    releases the lock when its holder exits, crashed or not, so a lock is never stale. Where
    ``fcntl`` is missing (Windows) it always yields True: run one worker per results file there.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - POSIX CI
        yield True
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@dataclass
class RunResult:
    """What one run measured. ``metric`` is the task's headline metric on the dev set (0–100);
    ``density`` holds the exact real-token density overall and per layer (in the dtype the model
    ran in), and for prompt / P-tuning ``virtual_tokens`` and ``exact_with_virtual``, the overall
    density counting the virtual tokens too (the official DEFT code's convention)."""

    name: str
    task: str
    method: str
    alpha: float
    metric: dict[str, Any]
    density: dict[str, Any]
    train_seconds: float
    metrics: dict[str, float] = field(default_factory=dict)
    thresholded: dict[str, Any] = field(default_factory=dict)
    trainable_parameters: int = 0
    steps: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunResult:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def load_result(run_dir: str | os.PathLike) -> RunResult:
    path = Path(run_dir) / RESULTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a finished deftune run directory?")
    return RunResult.from_dict(read_json(path))
