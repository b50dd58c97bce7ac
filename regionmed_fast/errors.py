"""Errors a user can act on. The ``regionmed-fast`` command prints them as one line (no
traceback) and exits with status 2; everything else is a bug and keeps its traceback."""
from __future__ import annotations

import importlib
from types import ModuleType


class UserError(Exception):
    """Base of the errors that are the input's fault, not the program's: the message names the
    file, line or argument at fault."""


class MissingDependency(UserError, ImportError):
    """An optional dependency is not installed; the message says which extra installs it."""


def require(module: str, *, extra: str, purpose: str, pip_name: str | None = None) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependency` with the one line that fixes it:
    ``<purpose> needs <pip_name>: pip install 'regionmed-fast[<extra>]'``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        name = pip_name or module.split(".")[0]
        raise MissingDependency(f"{purpose} needs the package {name!r}, which is not installed "
                                f"({exc.__class__.__name__}: {exc}); install it with: "
                                f"pip install 'regionmed-fast[{extra}]'") from None
