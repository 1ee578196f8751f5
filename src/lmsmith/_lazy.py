"""Packages that import their exported names on first use (PEP 562), so that ``import lmsmith``
and ``from lmsmith import distill`` stay light until a name is touched."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable


def lazy_exports(
    package: str, exports: dict[str, str], subpackages: tuple[str, ...] = ()
) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of a package whose names load lazily.

    Args:
        package: the package's ``__name__``.
        exports: exported name → the module that defines it.
        subpackages: names of subpackages reachable as attributes.
    Returns: (``__getattr__``, ``__dir__``) to assign at the package's top level.
    """

    def __getattr__(name: str):
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        if name in subpackages:
            return importlib.import_module(f"{package}.{name}")
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *exports, *subpackages})

    return __getattr__, __dir__
