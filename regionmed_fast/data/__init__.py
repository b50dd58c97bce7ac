"""Data pipeline: manifests (``manifest``), the split rule (``split``), the one batch path
(``batch``), box-aware transforms (``transforms``), CPU and DALI loaders (``loader.make_loader``),
WebDataset shards (``shards``), converters (``convert``), tokenisation hook (``text``) and the
synthetic phantoms (``synthetic``)."""
from __future__ import annotations

from regionmed_fast._lazy import lazy_getattr

_EXPORTS = {
    "make_loader": "regionmed_fast.data.loader",
    "read_manifest": "regionmed_fast.data.manifest",
    "ManifestError": "regionmed_fast.data.manifest",
    "write_shards": "regionmed_fast.data.shards",
    "build_batch": "regionmed_fast.data.batch",
    "select_split": "regionmed_fast.data.split",
    "record_split": "regionmed_fast.data.split",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr("regionmed_fast.data", _EXPORTS)
