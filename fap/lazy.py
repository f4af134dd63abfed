"""Lazy package exports (PEP 562): a package names its public objects, and the module that
holds each is imported on first use, so that importing the package (or a light submodule
such as its ``config``) loads no torch. Standard library only."""
from __future__ import annotations

import importlib
from typing import Callable, Dict, Iterable, Tuple

__all__ = ["lazy_exports"]


def lazy_exports(package: str, table: Dict[str, str], namespace: dict,
                 extra: Iterable[str] = ()) -> Tuple[Callable[[str], object], Callable[[], list]]:
    """A package's ``(__getattr__, __dir__)``: ``table`` maps a public name to the module that
    defines it; the first lookup imports it and caches the object in ``namespace`` (the
    package's ``globals()``). ``extra`` names the package's own lazy names, for ``__dir__``."""
    def __getattr__(name: str):
        if name in table:
            value = getattr(importlib.import_module(table[name]), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted(set(namespace) | set(table) | set(extra))

    return __getattr__, __dir__
