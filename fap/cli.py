"""The ``fap`` command line: ``fap data|eval|export|bench ...``.

Each subcommand lives with the module that does the work; this file only dispatches.
A subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

SUBCOMMANDS = {
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
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
