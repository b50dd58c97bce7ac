"""Triton kernels of regionmed-fast, installed as ``regionmed_fast.kernels``.

Imported under the top-level name ``kernels`` (a process started in the repository root has
this folder on ``sys.path``), this module hands the name over to the installed distribution of
that name, Hugging Face's ``kernels`` (a dependency of transformers), so that
``from kernels import ...`` in transformers finds what it expects. Our kernels are reached only
as ``regionmed_fast.kernels``.
"""
from __future__ import annotations

if __name__ == "kernels":
    import importlib.util
    import os
    import sys
    from importlib.machinery import PathFinder

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = PathFinder.find_spec("kernels", _path)
    if _spec is not None and _spec.loader is not None:
        _mod = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _mod  # the import statement returns what sys.modules holds
        _spec.loader.exec_module(_mod)
