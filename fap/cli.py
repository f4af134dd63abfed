"""The ``fap`` command line: ``fap train|data|eval|export|bench ...``.

Each subcommand lives with the module that does the work; this file only dispatches.
A subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``, except
``fap train --section.key=value ...``, whose overrides go to `fap.engine.main` as they are.
Errors fap diagnoses itself (bad config, data or checkpoint) print one line and exit 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

SUBCOMMANDS = {
    "train": ("fap.engine", "train from the default config plus --section.key=value overrides "
                            "(recipes/*.py are the usual entry point)"),
    "data": ("fap.data.cli", "make, convert and inspect datasets (demo, fashion-mnist, to-beton, inspect, corrupt)"),
    "eval": ("fap.evaluate", "evaluate a checkpoint or export: clean, corruptions, renditions, adversarial"),
    "export": ("fap.checkpoint", "export a training checkpoint as a plain timm safetensors file"),
    "bench": ("fap.bench", "measure step cost and throughput"),
}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="fap", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and not argv[0].startswith("-") else None
    if command == "train":
        from fap.engine import main as train_main

        return _diagnosed(command, lambda: train_main(argv[1:]))
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if name == command:
            try:
                mod = importlib.import_module(module)
            except ModuleNotFoundError as e:
                parser.error(f"'fap {name}' is not available in this install ({e})")
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    return _diagnosed(command, lambda: int(args._run(args) or 0))


def _diagnosed(command: str, fn) -> int:
    from fap.checkpoint import CheckpointError
    from fap.config import ConfigError
    from fap.data import DataError

    try:
        return fn()
    except (ConfigError, CheckpointError, DataError) as e:
        print(f"fap {command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
