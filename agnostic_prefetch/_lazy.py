"""Package attributes imported on first use (PEP 562), so ``import agnostic_prefetch`` stays light."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def attach(package: str, names: dict[str, str], public: list[str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``: ``names`` maps an attribute to its module.

    Example:
        >>> getattr_, dir_ = attach("pkg", {"sqrt": "math"}, ["sqrt"])
        >>> getattr_("sqrt")(9.0)
        3.0
    """
    def __getattr__(name: str) -> Any:
        if name in names:
            return getattr(importlib.import_module(names[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(public) | set(names))

    return __getattr__, __dir__
