"""Training checkpoints: atomic writes and the state needed to resume mid-stage exactly.

A checkpoint holds the model and optimizer state, the data position (stage index and optimizer
steps done in it), the RNG states of every rank, the logged loss history, and the run config's
fingerprint. Files are written to a temporary name in the same folder, flushed and fsynced, then
``os.replace``d over the target, so a kill at any moment leaves either the old or the new
checkpoint, never a torn one.
"""
from __future__ import annotations

import os
import random
import tempfile
from typing import Any

import torch

FORMAT_VERSION = 1
LAST = "last.pt"


class CheckpointMismatchError(RuntimeError):
    """A checkpoint written by a run with a different config (the message lists the keys)."""


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to ``path`` through a temporary file and ``os.replace``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path), dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def rng_state() -> dict[str, Any]:
    """The RNG states that training touches (python, numpy when present, torch, CUDA)."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _diff(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{prefix}{k}.")
        return out
    if isinstance(a, list) and isinstance(b, list) and a and isinstance(a[0], dict):
        if len(a) != len(b):
            return [f"{prefix.rstrip('.')}: checkpoint has {len(a)} entries, this run has {len(b)}"]
        out = []
        for i, (x, y) in enumerate(zip(a, b)):
            out += _diff(x, y, f"{prefix}{i}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: checkpoint has {a!r}, this run has {b!r}"]


def check_compatible(ckpt: dict, fingerprint: dict, model_config: dict | None, path: str) -> None:
    """Raise :class:`CheckpointMismatchError` naming every differing key."""
    if ckpt.get("format") != FORMAT_VERSION:
        raise CheckpointMismatchError(f"{path}: not a regionmed-fast training checkpoint of format "
                                      f"{FORMAT_VERSION} (got format={ckpt.get('format')!r})")
    diffs = _diff(ckpt.get("config"), fingerprint)
    if model_config is not None and ckpt.get("model_config") is not None:
        # op backends change speed, not results: a run may resume on another backend
        diffs += ["model." + d for d in _diff(ckpt["model_config"], model_config)
                  if not d.split(":")[0].endswith("backend")]
    if diffs:
        shown = "\n  ".join(diffs[:12]) + ("\n  ..." if len(diffs) > 12 else "")
        raise CheckpointMismatchError(
            f"{path} was written by a run with another config; refusing to resume.\n  {shown}\n"
            "Start a fresh run (another --out) or use the stage file that wrote it.")


def load(path: str) -> dict:
    """Read a checkpoint onto the CPU (``weights_only`` where the contents allow)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location="cpu", weights_only=False)
