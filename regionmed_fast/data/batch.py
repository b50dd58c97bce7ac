"""The one batch path: manifest records -> a model-ready batch (decode, box geometry, normalise,
tokenise, collate). Training loaders, the trainer and evaluation all build batches here;
evaluation is the same path with ``train=False`` (the whole image resized, no flip).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .manifest import ManifestError
from .sample import collate, load_sample, read_bytes
from .text import Tokenizer, tokenize_batch
from .transforms import Augment, normalize_uint8_batch


def build_batch(records: Sequence[dict], *, image_size: int, train: bool = False,
                tokenizer: Tokenizer | None = None, seed: int = 0, epoch: int = 0,
                indices: Sequence[int] | None = None, aug: Augment | None = None,
                decoder: str = "auto", skip_bad: bool = False,
                device: str | torch.device | None = None) -> dict:
    """One batch of ``records`` (validated manifest records, as ``read_manifest`` returns them).

    Returns the batch format of the data layer: ``images`` float32 [B, 3, S, S] (CLIP mean/std,
    on ``device`` when given), ``boxes`` float32 [B, Kmax, 4] in output pixels, ``box_counts``
    int64 [B], ``texts``, ``region_texts``, ``labels``, ``region_labels``, ``meta``, ``skipped``
    (records dropped as bad with ``skip_bad``); with ``tokenizer`` also ``text_ids`` /
    ``text_mask`` [B, L] and ``region_text_ids`` / ``region_text_mask`` [sum(box_counts), L].

    ``indices``: each record's index in its dataset (the geometry of sample ``i`` in ``epoch``
    is drawn from ``(seed, epoch, i)``; default ``0..B-1``). Without ``skip_bad`` a bad record
    raises :class:`ManifestError` naming its file and line.
    """
    if not isinstance(image_size, int) or image_size <= 0:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    idx = list(range(len(records))) if indices is None else list(indices)
    if len(idx) != len(records):
        raise ValueError(f"indices has {len(idx)} entries for {len(records)} records")
    samples = []
    for rec, i in zip(records, idx):
        try:
            samples.append(load_sample(rec, read_bytes(rec), size=image_size, train=train,
                                       seed=seed, epoch=epoch, index=int(i), decoder=decoder,
                                       aug=aug))
        except ManifestError:
            if not skip_bad:
                raise
            samples.append(None)
    out = collate(samples)
    out["skipped"] = int(out.pop("_skipped", 0))
    imgs = out["images"]
    if device is not None:
        imgs = imgs.to(device)
    out["images"] = normalize_uint8_batch(imgs) if imgs.shape[0] else imgs.float()
    if tokenizer is not None:
        tokenize_batch(out, tokenizer)
    return out
