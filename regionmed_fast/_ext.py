"""Loads the compiled extension once and remembers why it is missing when it is."""
from __future__ import annotations

import functools
from types import ModuleType


@functools.lru_cache(maxsize=None)
def load() -> tuple[ModuleType | None, str]:
    """Return ``(module, reason)``; ``module`` is None when ``regionmed_fast._C`` cannot load."""
    try:
        import torch  # noqa: F401  (the extension links against libtorch)

        from regionmed_fast import _C
    except Exception as exc:  # ImportError, or an undefined symbol from a torch mismatch
        return None, f"regionmed_fast._C not importable: {type(exc).__name__}: {exc}"
    return _C, ""


def has_cpu_kernels() -> bool:
    """True when the C++ CPU kernels are registered under ``torch.ops.regionmed_fast_C``."""
    return load()[0] is not None


def has_cuda_kernels() -> bool:
    """True when the extension was built with its CUDA kernels (a GPU may still be absent)."""
    mod, _ = load()
    return mod is not None and bool(mod.cuda_compiled())
