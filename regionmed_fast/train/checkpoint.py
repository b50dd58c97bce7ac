"""Training checkpoints: atomic writes and the state needed to resume mid-stage exactly.

A checkpoint holds the model and optimizer state, the data position (stage index and optimizer
steps done in it), the RNG states of every rank, the logged loss history, and the run config's
fingerprint. Files are written to a temporary name in the same folder, flushed and fsynced, then
``os.replace``d over the target, so a kill at any moment leaves either the old or the new
checkpoint, never a torn one.

Only tensors and plain containers (dict, list, tuple, str, int, float, bool, None) are written:
configs as dicts, RNG states as tensors. So :func:`load` reads with
``torch.load(weights_only=True)``, which refuses to unpickle anything else: opening a checkpoint
cannot run code from it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import random
import re
import tempfile
from typing import Any

import numpy as np
import torch

from regionmed_fast.errors import UserError

FORMAT_VERSION = 2
LAST = "last.pt"
# model config fields that may differ on resume: op backends change speed, not results;
# trained_image_size is set on the model only after the last stage
_RESUMABLE_MODEL_FIELDS = ("backend", "trained_image_size")


class CheckpointMismatchError(UserError, RuntimeError):
    """A checkpoint written by a run with a different config (the message lists the keys)."""


class UnsafeCheckpointError(UserError, RuntimeError):
    """A checkpoint holding objects other than tensors and plain containers (not unpickled)."""


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
    """The RNG states that training touches (python, numpy, torch, CUDA), as
    tensors and numbers only."""
    version, words, gauss = random.getstate()
    state: dict[str, Any] = {"python": {"version": version, "state": torch.tensor(words, dtype=torch.int64),
                                        "gauss": gauss},
                             "torch": torch.get_rng_state()}
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)),
                      "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"],
                             n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def model_config_dict(model: torch.nn.Module) -> dict | None:
    """``model.config`` as plain JSON (what a checkpoint records of the architecture)."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    if dataclasses.is_dataclass(cfg):
        cfg = dataclasses.asdict(cfg)
    elif hasattr(cfg, "to_dict"):
        cfg = cfg.to_dict()
    elif not isinstance(cfg, dict):
        cfg = dict(vars(cfg))
    return json.loads(json.dumps(cfg, default=str))


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
        diffs += ["model." + d for d in _diff(ckpt["model_config"], model_config)
                  if not d.split(":")[0].endswith(_RESUMABLE_MODEL_FIELDS)]
    if diffs:
        shown = "\n  ".join(diffs[:12]) + ("\n  ..." if len(diffs) > 12 else "")
        raise CheckpointMismatchError(
            f"{path} was written by a run with another config; refusing to resume.\n  {shown}\n"
            "Start a fresh run (another --out) or use the stage file that wrote it.")


def load(path: str) -> dict:
    """Read a checkpoint onto the CPU with ``torch.load(weights_only=True)``: tensors and plain
    containers only; anything else is an :class:`UnsafeCheckpointError` (nothing is run)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        why = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", str(exc))
        raise UnsafeCheckpointError(
            f"{path}: refusing to load: it holds objects other than tensors and plain containers"
            + (f" (a {why.group(1)})" if why else "") + "; a regionmed-fast training checkpoint "
            "never does") from None
    if not isinstance(state, dict):
        raise UnsafeCheckpointError(f"{path}: not a training checkpoint (a {type(state).__name__})")
    return state
