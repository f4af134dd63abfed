"""The ``fap`` command line: ``fap train|data|eval|export|bench|compare ...``, and the recipes' entry point.

Each subcommand lives with the module that does the work; this file only dispatches.
A subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``, except
``fap train --section.key=value ...``, which is `train_cli`, the entry point every recipe
ends with. Errors fap diagnoses itself (bad config, data or checkpoint: `ConfigError`,
`DataError`, `CheckpointError`) print one or two lines and exit 2; ``--debug`` shows them
with their traceback. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import TYPE_CHECKING, Callable, List, Optional, Sequence, Union

if TYPE_CHECKING:
    from fap.config import TrainConfig

__all__ = ["main", "run_main", "train_cli"]

DEBUG_FLAG = "--debug"
USER_ERROR_STATUS = 2

SUBCOMMANDS = {
    "train": ("fap.cli", "train from the default config plus --section.key=value overrides "
                         "(recipes/*.py are the usual entry point; dispatched to train_cli)"),
    "data": ("fap.data.cli", "make, convert and inspect datasets (demo, demo-det, fashion-mnist, to-beton, inspect, corrupt)"),
    "eval": ("fap.evaluate", "evaluate a checkpoint or export: clean, corruptions, renditions, adversarial"),
    "export": ("fap.checkpoint", "export a training checkpoint as a plain timm safetensors file"),
    "bench": ("fap.bench", "measure step cost and throughput"),
    "compare": ("fap.experiment.cli", "does it help on my data? arms x seeds of runs, paired statistics"),
}


def main(argv: Optional[List[str]] = None) -> int:
    """``fap [--debug] COMMAND ...``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv
    argv = [a for a in argv if a != DEBUG_FLAG]
    command = argv[0] if argv and not argv[0].startswith("-") else None
    if command == "train":
        from fap.config import TrainConfig

        return train_cli(TrainConfig(), argv[1:] + ([DEBUG_FLAG] if debug else []), prog="fap train")
    parser = argparse.ArgumentParser(prog="fap", description=__doc__.splitlines()[0],
                                     epilog=f"{DEBUG_FLAG}: show the traceback of an error fap diagnosed")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
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
        return USER_ERROR_STATUS
    return _diagnosed(f"fap {command}", lambda: int(args._run(args) or 0), debug=debug)


def train_cli(
        config: Union["TrainConfig", Callable[[str], "TrainConfig"]],
        argv: Optional[Sequence[str]] = None,
        *,
        smoke: Optional[Callable[["TrainConfig"], "TrainConfig"]] = None,
        prog: Optional[str] = None,
) -> int:
    """Train from a command line: the entry point of ``fap train``, the recipes and ``python -m fap.engine``.

    Parses ``[--debug] [--smoke] [--method NAME] [--section.key=value ...]`` onto
    ``config`` (`fap.config.parse_args`), checks that the run names its data, and calls
    `fap.train`. A recipe ends with ``sys.exit(fap.train_cli(config, smoke=smoke))``.

    Args:
        config: the run's config, or a function from a method name to the config (for
            recipes whose settings depend on the method; it gets `fap.config.peek_method`).
        argv: the arguments; default ``sys.argv[1:]``.
        smoke: the recipe's smoke transformation, applied by ``--smoke``.
        prog: the name errors start with; default the script as it was run.

    Returns:
        0, or 2 after one or two lines naming a mistake in the config, data or checkpoint
        (`ConfigError`, `DataError`, `CheckpointError`); ``--debug`` re-raises it instead.
    """
    prog = prog or _script_name()
    return run_main(lambda args: _train_from_args(config, args, smoke=smoke, prog=prog), argv, prog=prog)


def run_main(fn: Callable[[List[str]], Optional[int]], argv: Optional[Sequence[str]] = None, *,
             prog: Optional[str] = None) -> int:
    """Call ``fn(argv)`` with ``--debug`` taken out, diagnosing the user's mistakes.

    For scripts with a ``main(argv)`` of their own (``recipes/demo.py``):
    ``sys.exit(fap.cli.run_main(main))``.

    Args:
        fn: the script's work; returns its exit status (None = 0).
        argv: the arguments; default ``sys.argv[1:]``.
        prog: the name errors start with; default the script as it was run.

    Returns:
        ``fn``'s status, or 2 after one or two lines if it raised `ConfigError`,
        `DataError` or `CheckpointError` (re-raised with ``--debug``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv
    args = [a for a in argv if a != DEBUG_FLAG]
    return _diagnosed(prog or _script_name(), lambda: int(fn(args) or 0), debug=debug)


def _train_from_args(config, argv: List[str], *, smoke, prog: str) -> int:
    from fap.config import ConfigError, parse_args, peek_method

    cfg = config(peek_method(argv)) if callable(config) else config
    cfg = parse_args(cfg, argv, smoke=smoke)
    if not cfg.data.path and cfg.task == "detection":
        raise ConfigError("data.path is empty: point the run at a COCO-format root (DIR/<split>/images, "
                          "DIR/annotations/instances_<split>.json) with --data.path=DIR;\n  or try it on the demo "
                          f"detection set: {prog} --data.source=demo-det --data.path=data/demo-det")
    if not cfg.data.path:
        demo = f"{prog}{' --smoke' if smoke is not None else ''} --data.source=demo --data.path=data/demo"
        raise ConfigError(
            "data.path is empty: point the run at ImageNet with --data.source=folder|hf|ffcv --data.path=DIR "
            "(class folders, an HF datasets directory, or DIR/train.beton and val.beton);\n"
            f"  or try it on the built-in demo data: {demo}")
    from fap.engine import train

    train(cfg)
    return 0


def _diagnosed(prog: str, fn: Callable[[], int], *, debug: bool = False) -> int:
    from fap.checks import CheckpointError, ConfigError, DataError  # torch-free: a config error loads no torch

    try:
        return fn()
    except (ConfigError, CheckpointError, DataError) as e:
        if debug:
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        return USER_ERROR_STATUS


def _script_name() -> str:
    name = sys.argv[0] if sys.argv and sys.argv[0] else "fap"
    return "fap" if name.endswith("__main__.py") else name


if __name__ == "__main__":
    sys.exit(main())
