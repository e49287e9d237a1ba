"""Lazily imported public names, so importing a package stays cheap (diffusers, torchmetrics and
friends load only when a name that needs them is used)."""
from __future__ import annotations

import importlib
from typing import Callable, Dict, Tuple


def lazy_names(package: str, table: Dict[str, str], namespace: dict) -> Tuple[Callable, Callable]:
    """Module-level ``__getattr__`` and ``__dir__`` for ``package`` that import ``table[name]``
    (a module path) on first use of ``name`` and cache the value in ``namespace``."""

    def __getattr__(name):
        if name in table:
            value = getattr(importlib.import_module(table[name]), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted(list(namespace) + list(table))

    return __getattr__, __dir__
