"""Lazy re-exports: a module names where each public symbol lives and imports it on first use,
so one op's import cost (or a missing optional dependency) never touches another's."""
from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_getattr(module: str, exports: dict[str, str]) -> Callable[[str], object]:
    """A module-level ``__getattr__`` serving ``exports`` (symbol -> defining module)."""
    def __getattr__(name: str) -> object:
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    return __getattr__
