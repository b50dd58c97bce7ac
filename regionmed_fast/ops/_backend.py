"""Backend choice, in one place: one :class:`BackendTable` per op.

A table lists the op's backends. Each :class:`Backend` names its kernel provider (what runs),
the device types it runs on and an availability check that returns ``""`` or the reason it
cannot run. The op resolves ``backend=`` through its table, and ``regionmed-fast info`` prints
every table, so the two can never disagree.

Names mean one thing across ops: ``reference`` (plain PyTorch), ``cpp`` (the C++/OpenMP kernels
of ``regionmed_fast._C``), ``cuda`` (its CUDA kernels), ``triton`` (``regionmed_fast.kernels``),
``torch-tiled`` / ``torch-full`` (PyTorch GEMMs, tiled or with the whole logits). ``cpu`` is an
alias whose meaning each table states (the op's fastest CPU backend); ``auto`` picks the first
available backend of the device type's preference list. A backend asked for by name that cannot
run raises with the reason, so a benchmark never silently measures something else.
"""
from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

AUTO = "auto"


def triton_interpret() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_import_status() -> str:
    """``""`` when ``triton`` imports, else why not (imported here, on demand: it is optional
    and takes ~0.6 s)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:
        return f"triton not importable: {type(exc).__name__}: {exc}"
    return ""


def triton_device_status(device: torch.device) -> str:
    """Triton runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (tests)."""
    reason = triton_import_status()
    if reason:
        return reason
    if device.type == "cuda" or (device.type == "cpu" and triton_interpret()):
        return ""
    return f"triton needs a CUDA device (or TRITON_INTERPRET=1 for CPU tensors), got {device}"


def always(device: torch.device) -> str:
    return ""


@dataclass(frozen=True)
class Backend:
    """One way to run an op.

    ``provider``: what runs, as ``info`` shows it. ``devices``: device types it accepts (a
    tensor elsewhere makes it unavailable with that reason). ``check(device)``: ``""`` when the
    kernels are there, else the reason (a missing extension, an import error...).
    """

    name: str
    provider: str
    devices: tuple[str, ...]
    check: Callable[[torch.device], str] = always


class BackendTable:
    """The backends of one op, its ``auto`` order per device type and its aliases."""

    def __init__(self, op: str, backends: Sequence[Backend], auto: dict[str, tuple[str, ...]],
                 aliases: dict[str, str] | None = None):
        self.op = op
        self.backends = {b.name: b for b in backends}
        self.auto = {k: tuple(v) for k, v in auto.items()}
        self.aliases = dict(aliases or {})
        for name in [*self.aliases.values(), *(n for v in self.auto.values() for n in v)]:
            if name not in self.backends:
                raise ValueError(f"{op}: table refers to unknown backend {name!r}")
        # A plain dict memo (not lru_cache): under torch.compile dynamo reads a hit as a constant.
        self._memo: dict[tuple[str, str], str] = {}
        TABLES[op] = self

    @property
    def names(self) -> tuple[str, ...]:
        """Every name ``backend=`` accepts (concrete, aliases, ``auto``)."""
        return (*self.backends, *self.aliases, AUTO)

    def canonical(self, backend: str) -> str:
        """A concrete backend name for ``backend`` (aliases resolved; ``auto`` is kept)."""
        if backend == AUTO or backend in self.backends:
            return backend
        if backend in self.aliases:
            return self.aliases[backend]
        raise ValueError(f"{self.op}: backend={backend!r} is not one of {self.names}")

    def status(self, backend: str, device: torch.device | str) -> str:
        """``""`` when ``backend`` can run on ``device``, else why not."""
        device = torch.device(device)
        name = self.canonical(backend)
        key = (name, device.type)
        if key not in self._memo:
            b = self.backends[name]
            if device.type not in b.devices and not (name == "triton" and device.type == "cpu"):
                self._memo[key] = (f"the {name} backend of {self.op} runs on "
                                   f"{'/'.join(b.devices)} tensors, got {device.type}")
            else:
                self._memo[key] = b.check(device)
        return self._memo[key]

    def resolve(self, backend: str, device: torch.device | str) -> str:
        """The concrete backend that runs for ``backend`` on ``device``; raises (with the reason)
        when a named backend cannot run there. ``auto`` falls back to ``reference``."""
        device = torch.device(device)
        name = self.canonical(backend)
        if name == AUTO:
            for cand in self.auto.get(device.type, ()):
                if self.status(cand, device) == "":
                    return cand
            return "reference"
        reason = self.status(name, device)
        if reason:
            raise RuntimeError(f"{self.op}: backend={backend!r} is not available on {device}: {reason}")
        return name

    def report(self, device: torch.device | str) -> dict[str, str]:
        """Every concrete backend on ``device``: name -> ``"ok"`` or the reason it cannot run."""
        return {n: (self.status(n, device) or "ok") for n in self.backends}

    def describe(self) -> dict:
        """The table as ``info`` prints it (JSON-able)."""
        return {"backends": {n: {"provider": b.provider, "devices": list(b.devices)}
                             for n, b in self.backends.items()},
                "auto": {k: list(v) for k, v in self.auto.items()},
                "aliases": dict(self.aliases)}


#: op name -> its table; filled when the op's module is imported (see :func:`all_tables`).
TABLES: dict[str, BackendTable] = {}

_OP_MODULES = ("regionmed_fast.ops.roi", "regionmed_fast.ops.loss")


def all_tables() -> dict[str, BackendTable]:
    """Every op's table (imports the op modules)."""
    for mod in _OP_MODULES:
        importlib.import_module(mod)
    return dict(TABLES)
