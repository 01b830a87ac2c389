"""Progress bars (rich), silenced when not on a terminal or when DEFTUNE_NO_PROGRESS is set."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import TypeVar

T = TypeVar("T")


def progress_enabled() -> bool:
    return not os.environ.get("DEFTUNE_NO_PROGRESS") and sys.stderr.isatty()


def track(items: Iterable[T], description: str = "", total: int | None = None) -> Iterable[T]:
    """Iterate over ``items`` with a progress bar on a terminal; plain iteration otherwise."""
    if not progress_enabled():
        yield from items
        return
    from rich.console import Console
    from rich.progress import track as rich_track

    # drawn on stderr, the stream checked above: stdout stays clean for results (JSON, tables)
    yield from rich_track(items, description=description, total=total, transient=True, console=Console(stderr=True))
