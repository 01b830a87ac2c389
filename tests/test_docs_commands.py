"""Every ``deftune ...`` command written in the README and docs parses with today's CLI: a renamed
or removed flag fails here, not in a user's shell."""

from __future__ import annotations

import argparse
import functools
import re
import shlex
from pathlib import Path

import pytest

from deftune.cli import build_parser, command_modules

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)  # (language, body)
SHELLS = ("", "bash", "sh", "console")
TEMPLATE_MARKS = ("...", "[--", "<")  # a line with a placeholder: `[--device cuda]`, `<run flags>`
INLINE = re.compile(r"`(deftune [^`]+)`")


def commands(text: str) -> list[tuple[str, list[str]]]:
    """``(kind, argv)`` of every ``deftune`` command of a markdown text: ``"block"`` for lines of
    fenced blocks (``\\`` continuations joined, ``# comments`` dropped), ``"inline"`` for code
    spans and block lines with placeholders, which may name a command or an option without a
    whole command line."""
    found = []
    for language, block in FENCE.findall(text):
        if language not in SHELLS:
            continue
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line.startswith("deftune "):
                template = any(mark in line for mark in TEMPLATE_MARKS)  # placeholders: check names only
                found.append(("inline" if template else "block", shlex.split(line.replace("[", " ").replace("]", " "), comments=True)))
    found += [("inline", shlex.split(span)) for span in INLINE.findall(FENCE.sub("", text))]
    return found


CASES = [(path.relative_to(ROOT).as_posix(), kind, argv)
         for path in DOCS for kind, argv in commands(path.read_text("utf-8"))]


def test_the_docs_have_commands():
    docs = {p for p, _, _ in CASES}
    assert len(CASES) > 30 and docs >= {"README.md", "docs/results.md", "docs/calibration.md"}, docs


def test_commands_splits_blocks_continuations_comments_and_inline_spans():
    text = ("```bash\ndeftune train --task sst2 \\\n    --alpha 0  # a comment\nls\n```\n"
            "Run `deftune measure --model minilm` or `python x.py`.")
    assert commands(text) == [("block", ["deftune", "train", "--task", "sst2", "--alpha", "0"]),
                              ("inline", ["deftune", "measure", "--model", "minilm"])]


_parser = functools.cache(build_parser)  # one parser for every case (parsing does not change it)


def _leaf_options(argv: list[str]) -> set[str]:
    """The options of the (sub-)sub-command that ``argv`` names (``sweep quant`` has its own)."""
    parser = _parser()
    for token in argv[1:]:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or token not in subs[0].choices:
            break
        parser = subs[0].choices[token]
    return {s for action in parser._actions for s in action.option_strings}


@pytest.mark.parametrize(("doc", "kind", "argv"), CASES, ids=[f"{p}:{' '.join(a[1:3])}" for p, _, a in CASES])
def test_documented_command_parses(doc, kind, argv):
    shown = f"{doc}: `{shlex.join(argv)}`"
    if argv[1:] in (["--help"], ["COMMAND", "--help"]):
        return
    assert len(argv) > 1 and argv[1] in command_modules(), f"{shown}: no such command"
    if kind == "inline":  # a mention: the command and every option it names exist
        unknown = [t for t in argv[2:] if t.startswith("--") and t.split("=")[0] not in _leaf_options(argv)]
        assert not unknown, f"{shown}: unknown options {unknown}"
        return
    try:
        args = _parser().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"{shown} does not parse with the current CLI")
    assert args.command == argv[1]
