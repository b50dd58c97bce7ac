"""Data pipeline: manifests (``manifest``), box-aware transforms (``transforms``), CPU and DALI
loaders (``loader.make_loader``), WebDataset shards (``shards``), converters (``convert``),
tokenisation hook (``text``) and the synthetic phantoms (``synthetic``)."""
from __future__ import annotations

import importlib

_LAZY = {
    "make_loader": "regionmed_fast.data.loader",
    "read_manifest": "regionmed_fast.data.manifest",
    "ManifestError": "regionmed_fast.data.manifest",
    "write_shards": "regionmed_fast.data.shards",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'regionmed_fast.data' has no attribute {name!r}")
