"""The ``deftune`` command line.

Each sub-command lives in its own module in this package and exposes

* ``COMMAND``: the sub-command name;
* ``HELP``: a one-line summary;
* ``add_arguments(parser)``: its arguments (every one with a ``help=``);
* ``run(args) -> int``: builds a config from ``args``, calls the library (one typed function where
  one does the whole job) and returns an exit code.

Modules are discovered automatically, so adding a sub-command is adding one file.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from types import ModuleType

from deftune.cli._args import HelpFormatter


def command_modules() -> dict[str, ModuleType]:
    """name -> module of every sub-command in this package."""
    found: dict[str, ModuleType] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "COMMAND"):
            found[module.COMMAND] = module
    return dict(sorted(found.items()))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deftune",
        description=(
            "Density-efficient fine-tuning (DEFT): PEFT plus a density loss that makes MLP "
            "activations sparse, with honest measurement of density, speed and memory."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `deftune COMMAND --help` for the options of one command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in command_modules().items():
        p = sub.add_parser(
            name,
            help=module.HELP,
            description=(module.__doc__ or module.HELP).strip(),
            formatter_class=HelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        # Configuration and data errors: one clear line, no traceback.
        print(f"deftune {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a folder that cannot be written; a model that is neither known nor reachable
        from deftune.models import known_names

        hint = ("" if isinstance(err, PermissionError) else
                f" (models known offline: {', '.join(known_names())}; or give a local model folder)")
        print(f"deftune {args.command}: error: {err}{hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"deftune {args.command}: interrupted; files already written are whole (written atomically); "
              "compare and sweeps resume where they stopped when run again", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
