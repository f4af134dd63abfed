"""What the configuration dataclasses share: the user's-mistake errors and the checks of values.

`ConfigError`, `DataError` (and `DataNotFoundError`) and `CheckpointError` are the errors
the command line prints in one or two lines with exit status 2 (`fap.cli`); they live here,
re-exported by `fap.data` and `fap.checkpoint`, so catching them loads no torch.

A field with a closed set of choices is annotated ``typing.Literal[...]`` (or
``Optional[Literal[...]]``); the annotation is the one place the choices are written.
The command-line parser (`fap.config`) reads them to parse values and print ``--help``,
and `check_choices` checks a dataclass built in Python against them. This module imports
nothing but the standard library, so every config section (`fap.config`, `fap.data.config`,
`fap.methods.config`, `fap.evaluation.config`, `fap.detection.config`) can use it, and
importing `fap.config` loads no torch.
"""
from __future__ import annotations

import dataclasses
import importlib
import typing
from typing import Any, Literal, Optional, Tuple, Union

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DataNotFoundError",
    "MissingExtra",
    "check_choices",
    "check_epsilon",
    "choices_text",
    "import_extra",
    "literal_choices",
    "require",
]


class ConfigError(ValueError):
    """A configuration that cannot run. The message names the key, the value and what is valid."""


class DataError(ValueError):
    """A dataset that cannot be used as it is. The message names the file or key and the fix."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A dataset directory, split or file that is not there. The message names the path and the fix."""


class CheckpointError(RuntimeError):
    """A checkpoint or resume request that cannot be honoured; the message says why and what to do."""


class MissingExtra(ConfigError, ImportError):
    """An optional dependency is not installed; the message names the ``fap[extra]`` that installs it.

    A `ConfigError` (the command line prints it in one line, exit status 2) and an
    ``ImportError`` (code that tolerates a missing package still catches it).
    """


def import_extra(module: str, extra: str, needed_for: str):
    """Import ``module`` (an optional dependency), or raise `MissingExtra`.

    Args:
        module: e.g. ``"datasets"``.
        extra: the pyproject extra that installs it, e.g. ``"hf"``.
        needed_for: what needs it, e.g. ``"data.source='hf'"``.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtra(f"{needed_for} needs the package {module.split('.')[0]!r}, which is not importable "
                           f"here ({e}); install it with: pip install 'fap[{extra}]'") from e


def literal_choices(tp: Any) -> Optional[Tuple[Any, ...]]:
    """The choices of ``Literal[...]`` (``None`` added for ``Optional[Literal[...]]``); None otherwise."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return typing.get_args(tp)
    if origin is Union:
        args = typing.get_args(tp)
        literals = [a for a in args if typing.get_origin(a) is Literal]
        if len(literals) == 1 and all(a is type(None) or a is literals[0] for a in args):
            return typing.get_args(literals[0]) + (None,)
    return None


def choices_text(choices: Tuple[Any, ...]) -> str:
    """``"one of 'a', 'b' or None"``."""
    text = "one of " + ", ".join(repr(c) for c in choices if c is not None)
    return text + " or None" if None in choices else text


def check_choices(obj: Any, section: str) -> None:
    """Every ``Literal``-annotated field of the dataclass ``obj`` holds one of its choices.

    Args:
        obj: a dataclass instance.
        section: its name in messages (``"data"`` gives ``data.source=...``).

    Raises:
        ConfigError: naming ``section.key``, the value and the valid choices.
    """
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        choices = literal_choices(hints.get(f.name, Any))
        value = getattr(obj, f.name)
        if choices is not None and value not in choices:
            raise ConfigError(f"{section}.{f.name}={value!r} is not valid: expected {choices_text(choices)}")


def require(ok: bool, key: str, value: Any, expected: str) -> None:
    """Raise `ConfigError` ``"key=value is not valid: expected ..."`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key}={value!r} is not valid: expected {expected}")


def check_epsilon(epsilon: float, name: str = "epsilon") -> float:
    """An attack budget or step in 1/255 pixel units: a number in [0, 255]; returns it as a float.

    Raises:
        ValueError: naming ``name``, the value and the valid range (`fap.attacks` uses it
            too; the config sections turn it into a `ConfigError`).
    """
    if not isinstance(epsilon, (int, float)) or epsilon != epsilon or epsilon < 0:
        raise ValueError(f"{name} must be a number >= 0 in 1/255 pixel units (e.g. 1.0), got {epsilon!r}")
    if epsilon > 255:
        raise ValueError(f"{name}={epsilon} is in 1/255 units and cannot exceed 255")
    return float(epsilon)
