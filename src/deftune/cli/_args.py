"""Turn a config dataclass into argparse options (help text from its docstring's Attributes)."""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import typing
from typing import Any


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults and keeps the line breaks of each command's description (its examples).

    No "(default: ...)" for on/off flags (a ``--no-x`` flag's default True reads as "off by
    default"), required options, empty defaults, or help that states its default already.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (action.nargs == 0 or action.required or action.default in (None, "", (), [])
                or "default" in text.lower()):
            return action.help
        return super()._get_help_string(action)


def field_docs(cls: type) -> dict[str, str]:
    """``name -> help`` from the ``Attributes:`` section of ``cls.__doc__``."""
    doc = cls.__doc__ or ""
    section = doc.split("Attributes:", 1)[-1] if "Attributes:" in doc else ""
    docs: dict[str, str] = {}
    current: list[str] = []
    text: list[str] = []
    for line in section.splitlines():
        m = re.match(r"^\s{4,8}([a-z_][\w, ]*):\s*(.*)$", line)
        if m:
            for name in current:
                docs[name] = " ".join(text).strip()
            current = [n.strip() for n in m.group(1).split(",")]
            text = [m.group(2)]
        elif current:
            text.append(line.strip())
    for name in current:
        docs[name] = " ".join(text).strip()
    return docs


def _parse_bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {value!r}")


def _floats(value: str) -> tuple[float, ...]:
    return tuple(float(v) for v in value.split(",") if v)


def _or_none(cast: type):
    """``cast`` that also reads ``none`` as None (an optional field whose default is not None)."""

    def parse(value: str):
        return None if value.strip().lower() == "none" else cast(value)

    parse.__name__ = cast.__name__  # argparse names the type in its "invalid int value" errors
    return parse


def positive_int(value: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value!r}")
    return number


def thresholds(value: str) -> tuple[float, ...]:
    """argparse type: comma-separated finite τ >= 0 (``1e-3,1e-2``)."""
    try:
        taus = _floats(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 1e-3,1e-2, got {value!r}") from None
    if any(not (t >= 0 and math.isfinite(t)) for t in taus):
        raise argparse.ArgumentTypeError(f"thresholds must be finite and >= 0, got {value!r}")
    return taus


def _ints(value: str) -> tuple[int, ...]:
    return tuple(int(v) for v in value.split(",") if v)


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, *, exclude: tuple[str, ...] = (),
                            defaults: dict[str, Any] | None = None) -> None:
    """Add ``--field-name`` for each field of ``cls`` (skipping ``exclude``); a field whose metadata
    has ``choices`` gets them as argparse choices."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    defaults = defaults or {}
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        hint = hints[f.name]
        default = defaults.get(f.name, f.default if f.default is not dataclasses.MISSING else f.default_factory())  # type: ignore[misc]
        kwargs: dict[str, Any] = {"default": default, "help": docs.get(f.name, "")}
        if "choices" in f.metadata:  # field(metadata={"choices": (...)}): argparse lists and checks them
            kwargs["choices"] = tuple(f.metadata["choices"])
        origin = typing.get_origin(hint)
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        base = args[0] if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and args else hint
        if base is bool:
            kwargs["type"] = _parse_bool
            kwargs["metavar"] = "BOOL"
        elif base in (int, float) and type(None) in typing.get_args(hint):
            kwargs["type"] = _or_none(base)
            kwargs["metavar"] = f"{base.__name__.upper()}|none"
        elif base in (int, float, str):
            kwargs["type"] = base
        elif typing.get_origin(base) is tuple:
            kwargs["type"] = _ints if typing.get_args(base)[:1] == (int,) else _floats
            kwargs["metavar"] = "X,Y,..."
        elif typing.get_origin(base) is dict:
            kwargs["type"] = parse_mapping
            kwargs["metavar"] = "K=V,..."
        else:
            continue
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kwargs)


def parse_mapping(value: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in filter(None, value.split(",")):
        if "=" not in item:
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE pairs, got {item!r}")
        key, raw = item.split("=", 1)
        for cast in (int, float):
            try:
                out[key] = cast(raw)
                break
            except ValueError:
                continue
        else:
            out[key] = _parse_bool(raw) if raw.lower() in ("true", "false") else raw
    return out


def dataclass_from_args(cls: type, args: argparse.Namespace, **overrides: Any):
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    values.update(overrides)
    return cls(**values)
