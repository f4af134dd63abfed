"""What the configuration dataclasses share: `ConfigError` and the check of ``Literal`` choices.

A field with a closed set of choices is annotated ``typing.Literal[...]`` (or
``Optional[Literal[...]]``); the annotation is the one place the choices are written.
The command-line parser (`fap.config`) reads them to parse values and print ``--help``,
and `check_choices` checks a dataclass built in Python against them. This module imports
nothing heavy, so every config section (`fap.config`, `fap.data.config`, the method
configs, `fap.evaluation.config`) can use it.
"""
from __future__ import annotations

import dataclasses
import importlib
import typing
from typing import Any, Literal, Optional, Tuple, Union

__all__ = ["ConfigError", "MissingExtra", "check_choices", "choices_text", "import_extra", "literal_choices", "require"]


class ConfigError(ValueError):
    """A configuration that cannot run. The message names the key, the value and what is valid."""


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
