"""Backend selection shared by every op: ``reference``, ``cpu``, ``triton``, ``cuda``, ``auto``.

A backend is *available* for a device when its code can run there; ``auto`` picks the first
available one in the op's preference order. An explicitly requested backend that cannot run
raises with the reason, so a benchmark never silently measures something else.
"""
from __future__ import annotations

import functools
import os

import torch

from regionmed_fast import _ext

BACKENDS = ("reference", "cpu", "triton", "cuda", "auto")


def triton_interpret() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _triton_import() -> str:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:
        return f"triton not importable: {type(exc).__name__}: {exc}"
    return ""


def status(backend: str, device: torch.device | str) -> str:
    """Return ``""`` when ``backend`` can run on ``device``, else why it cannot."""
    device = torch.device(device)
    if backend == "reference":
        return ""
    if backend == "cpu":
        if device.type != "cpu":
            return f"the cpu backend runs on CPU tensors, got {device}"
        return "" if _ext.has_cpu_kernels() else _ext.load()[1]
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend runs on CUDA tensors, got {device}"
        if not _ext.has_cpu_kernels():
            return _ext.load()[1]
        return "" if _ext.has_cuda_kernels() else (
            "regionmed_fast._C was built without CUDA (reinstall with FORCE_CUDA=1 or on a GPU machine)")
    if backend == "triton":
        reason = _triton_import()
        if reason:
            return reason
        if device.type == "cuda":
            return ""
        if device.type == "cpu" and triton_interpret():
            return ""
        return f"triton needs a CUDA device (or TRITON_INTERPRET=1 for CPU tensors), got {device}"
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def resolve(op: str, backend: str, device: torch.device | str, supported: tuple[str, ...],
            status_fn=None) -> str:
    """Map ``backend`` (possibly ``"auto"``) to a concrete backend of ``op`` for ``device``.

    ``supported`` lists the op's backends in ``auto`` preference order for GPUs; on the CPU
    ``auto`` prefers ``cpu`` then ``reference`` (the Triton interpreter is for testing only).
    ``status_fn(backend, device)`` replaces :func:`status` for ops that check more (for example
    that their compiled kernels are registered).
    """
    device = torch.device(device)
    status_fn = status_fn or status
    if backend == "auto":
        order = ("cpu", "reference") if device.type == "cpu" else tuple(
            b for b in supported if b != "cpu")
        for cand in order:
            if cand in supported and status_fn(cand, device) == "":
                return cand
        return "reference"
    if backend not in supported:
        raise ValueError(f"{op}: backend={backend!r} is not one of {supported + ('auto',)}")
    reason = status_fn(backend, device)
    if reason:
        raise RuntimeError(f"{op}: backend={backend!r} is not available on {device}: {reason}")
    return backend


def report(device: torch.device | str) -> dict[str, str]:
    """Availability of every concrete backend on ``device``: name -> ``"ok"`` or the reason."""
    return {b: (status(b, device) or "ok") for b in BACKENDS if b != "auto"}
