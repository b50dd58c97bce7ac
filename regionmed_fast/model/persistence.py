"""Saving and loading a RegionMedCLIP: ``config.json`` + ``model.safetensors``, no pickle.

``config.json`` is ``{"format", "version", "config": RegionMedConfig, "metadata": {...}}``;
``metadata`` is free JSON that travels with the weights (the trainer records its split
settings there under ``"split"``: ``group_key``, ``test_fraction``, ``val_fraction``;
evaluation reads them as its defaults).
"""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file

from .config import RegionMedConfig, config_diff

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "regionmed-fast/RegionMedCLIP"
FORMAT_VERSION = 1


def _write_atomic(path: str, write) -> None:
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)


def save_pretrained(model: torch.nn.Module, directory: str | os.PathLike,
                    metadata: dict | None = None) -> str:
    """Write ``config.json`` and ``model.safetensors`` of ``model`` into ``directory`` (each
    atomically: temp file + rename). ``metadata``: JSON-able dict stored with the config.
    Returns the directory."""
    d = os.fspath(directory)
    os.makedirs(d, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    _write_atomic(os.path.join(d, WEIGHTS_FILE),
                  lambda p: save_file(state, p, metadata={"format": FORMAT}))
    blob = {"format": FORMAT, "version": FORMAT_VERSION, "config": model.config.to_dict()}
    if metadata:
        blob["metadata"] = json.loads(json.dumps(metadata))  # a JSON-able copy, or an error now

    def write_json(p: str) -> None:
        with open(p, "w") as f:
            json.dump(blob, f, indent=2)
    _write_atomic(os.path.join(d, CONFIG_FILE), write_json)
    return d


def read_blob(directory: str | os.PathLike) -> dict:
    """The checked contents of ``directory/config.json``."""
    path = os.path.join(os.fspath(directory), CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: not a RegionMedCLIP save_pretrained folder")
    with open(path) as f:
        try:
            blob = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT or "config" not in blob:
        fmt = blob.get("format") if isinstance(blob, dict) else None
        raise ValueError(f"{path}: not a RegionMedCLIP config (format {fmt!r})")
    if blob.get("version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path}: format version {blob['version']} is newer than this "
                         f"library's {FORMAT_VERSION}")
    if not isinstance(blob.get("metadata", {}), dict):
        raise ValueError(f"{path}: 'metadata' must be an object")
    return blob


def read_config(directory: str | os.PathLike) -> RegionMedConfig:
    """The config saved in ``directory/config.json``."""
    path = os.path.join(os.fspath(directory), CONFIG_FILE)
    return RegionMedConfig.from_dict(read_blob(directory)["config"], where=path)


def read_metadata(directory: str | os.PathLike) -> dict:
    """The ``metadata`` saved with the model (``{}`` when none)."""
    return dict(read_blob(directory).get("metadata", {}))


def load_weights(model: torch.nn.Module, directory: str | os.PathLike,
                 map_location: str | torch.device = "cpu",
                 source_config: RegionMedConfig | None = None) -> None:
    """Load ``directory/model.safetensors`` into ``model``, strictly (see
    :func:`load_state_dict_checked`)."""
    path = os.path.join(os.fspath(directory), WEIGHTS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found")
    source_config = source_config or read_config(directory)
    state = load_file(path, device=str(map_location))
    load_state_dict_checked(model, state, source=path, source_config=source_config)


def _show(items: list[str]) -> str:
    return ", ".join(items[:8]) + (f" ... ({len(items)} in all)" if len(items) > 8 else "")


def load_state_dict_checked(model: torch.nn.Module, state: dict[str, torch.Tensor],
                            source: str = "state dict",
                            source_config: RegionMedConfig | None = None) -> None:
    """``load_state_dict(strict=True)`` with one clear error listing missing, unexpected
    and shape-mismatched keys (and the config fields that differ, when known)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: {tuple(state[k].shape)} (checkpoint) vs {tuple(own[k].shape)} (model)"
              for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f"checkpoint {source} does not fit this {model.config.name} model"]
        if source_config is not None:
            diff = config_diff(source_config.to_dict(), model.config.to_dict())
            if diff:
                parts.append("config differs: " + _show(diff))
        if missing:
            parts.append("missing keys: " + _show(missing))
        if unexpected:
            parts.append("unexpected keys: " + _show(unexpected))
        if shapes:
            parts.append("shape mismatches: " + _show(shapes))
        raise ValueError("; ".join(parts))
    model.load_state_dict(state, strict=True)
