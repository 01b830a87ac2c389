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
        if (action.nargs == 0 or action.required or action.default in (None, "", (), [], {})
                or "(default" in text.lower() or "%(default)" in text or action.default is argparse.SUPPRESS):
            return action.help
        # the default as the option is typed: 1e-3,1e-2 and k=v,... rather than Python reprs
        return f"{text} (default: {show_default(action.default)})".replace("%", "%%")  # argparse applies %


def show_default(value: Any) -> str:
    """``value`` written as the command line takes it (tuples comma-separated, mappings ``k=v``)."""
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def _plain(text: str) -> str:
    """Docstring markup out of help text: ``x`` and :func:`x` read as x."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", text)
    return re.sub(r"``([^`]+)``", r"\1", text)


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
    return {name: _plain(text) for name, text in docs.items()}


def _parse_bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {value!r}")


def floats(value: str) -> tuple[float, ...]:
    """argparse type: comma-separated numbers (``0,0.1``)."""
    return tuple(float(v) for v in value.split(",") if v)


def _or_none(cast: type):
    """``cast`` that also reads ``none`` (or an empty value) as None, for optional fields."""

    def parse(value: str):
        return None if value.strip().lower() in ("", "none") else cast(value)

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
        taus = floats(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 1e-3,1e-2, got {value!r}") from None
    if any(not (t >= 0 and math.isfinite(t)) for t in taus):
        raise argparse.ArgumentTypeError(f"thresholds must be finite and >= 0, got {value!r}")
    return taus


def strs(value: str) -> tuple[str, ...]:
    """argparse type: comma-separated names (``sst2,mrpc``), blanks dropped."""
    return tuple(v.strip() for v in value.split(",") if v.strip())


def ints(value: str) -> tuple[int, ...]:
    """argparse type: comma-separated integers (``0,1,2``)."""
    return tuple(int(v) for v in value.split(",") if v)


GIVEN = "_given_options"  # namespace attribute: the dests of the options typed on the command line


class _StoreGiven(argparse.Action):
    """``store`` that also records its dest in ``namespace._given_options`` (see :func:`given_options`)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        setattr(namespace, GIVEN, {*getattr(namespace, GIVEN, ()), self.dest})


def given_options(args: argparse.Namespace) -> set[str]:
    """The dests of the dataclass options typed on the command line, whatever their values (an
    option given with its default value counts as given)."""
    return set(getattr(args, GIVEN, ()))


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
        elif base is str and type(None) in typing.get_args(hint) and "choices" not in kwargs:
            kwargs["type"] = _or_none(str)  # an optional name or path: ``none`` gives None
        elif base in (int, float, str):
            kwargs["type"] = base
        elif typing.get_origin(base) is tuple:
            item = typing.get_args(base)[:1]
            kwargs["type"] = ints if item == (int,) else strs if item == (str,) else floats
            kwargs["metavar"] = "X,Y,..."
        elif typing.get_origin(base) is dict:
            kwargs["type"] = parse_mapping
            kwargs["metavar"] = "K=V,..."
        else:
            continue
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, action=_StoreGiven, **kwargs)


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
