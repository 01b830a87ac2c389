"""Progress bars: every item comes through, with or without a terminal; silenced by the env var."""

from __future__ import annotations

import sys

from deftune.progress import progress_enabled, track


def test_items_pass_through_off_a_terminal(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert not progress_enabled()
    assert list(track(range(5), description="x")) == [0, 1, 2, 3, 4]


def test_items_pass_through_on_a_terminal_and_the_env_var_silences(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    monkeypatch.delenv("DEFTUNE_NO_PROGRESS", raising=False)
    assert progress_enabled()
    assert list(track(iter("abc"), description="y", total=3)) == ["a", "b", "c"]
    monkeypatch.setenv("DEFTUNE_NO_PROGRESS", "1")
    assert not progress_enabled()


def test_the_bar_is_drawn_on_stderr_never_on_stdout(monkeypatch, capsys):
    """stdout carries results (JSON, tables): the bar goes to stderr, the stream whose terminal turned it on."""
    import rich.progress

    seen = []
    real = rich.progress.track
    monkeypatch.setattr(rich.progress, "track", lambda *a, **kw: (seen.append(kw["console"]), real(*a, **kw))[1])
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    monkeypatch.delenv("DEFTUNE_NO_PROGRESS", raising=False)
    assert list(track(range(3), description="z")) == [0, 1, 2]
    assert len(seen) == 1 and seen[0].stderr
    assert capsys.readouterr().out == ""
