"""The one batch path: records -> samples -> a model-ready batch (decode, box geometry, side
words, normalise, tokenise, collate).

Every loader backend and evaluation build batches here: the CPU path and shards with
:class:`SampleMaker` + :func:`collate` in their worker processes and :func:`finish_batch` in the
main process, DALI with :func:`collate` of its host-side fields around the images its pipeline
made, evaluation with :func:`build_batch` (``train=False``: the whole image resized, no flip).
The per-sample steps and :func:`collate` live in ``regionmed_fast.data.sample`` (which imports
nothing from here: no import cycle); the batch format is docs/design.md section 5.4.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from .cache import ByteLRU
from .manifest import ManifestError
from .sample import (any_crop_min_size, collate, crop_min_size, decode_record, geometry,
                     read_bytes, render_sample, sample_key)
from .text import Tokenizer, tokenize_batch
from .transforms import CLIP_MEAN, CLIP_STD, Augment, normalize_uint8_batch

log = logging.getLogger("regionmed_fast.data")


class SampleMaker:
    """Samples of records for one loader: geometry from (seed, stage, epoch, key), decode
    (reduced-size where the crop allows), crop/resize/flip, and the optional decoded-sample
    cache of ``cache_mb`` MiB (this process's; a miss and a hit give the same pixels: with a
    cache every decode is made at the scale that serves any crop of the record).

    :meth:`sample` returns None for a bad record when ``skip_bad`` (else raises
    :class:`ManifestError` naming its file and line)."""

    def __init__(self, *, image_size: int, train: bool, seed: int = 0, stage: int = 0,
                 aug: Augment | None = None, decoder: str = "auto", reduced_decode: bool = True,
                 skip_bad: bool = False, cache_mb: float = 0):
        self.size, self.train, self.seed, self.stage = image_size, train, seed, stage
        self.aug = aug or Augment()
        self.decoder, self.reduced_decode, self.skip_bad = decoder, reduced_decode, skip_bad
        self.cache = ByteLRU(int(cache_mb * (1 << 20))) if cache_mb else None

    def __getstate__(self):  # a worker process starts with an empty cache of its own
        state = dict(self.__dict__)
        if state["cache"] is not None:
            state["cache"] = ByteLRU(state["cache"].budget)
        return state

    def _decoded(self, rec: dict, data: bytes | None, p, key):
        if self.cache is None:
            want = crop_min_size(rec, p, self.size) if self.reduced_decode else None
            return decode_record(rec, read_bytes(rec) if data is None else data, min_size=want,
                                 decoder=self.decoder)
        hit = self.cache.get(("decoded", key))
        if hit is None:
            want = any_crop_min_size(rec, self.size, self.aug, True) if self.reduced_decode else None
            hit = decode_record(rec, read_bytes(rec) if data is None else data, min_size=want,
                                decoder=self.decoder)
            self.cache.put(("decoded", key), hit)
        return hit

    def sample(self, rec: dict, epoch: int, position: int = 0, data: bytes | None = None) -> dict | None:
        """The sample of ``rec`` in ``epoch`` (``data``: its encoded image when already read)."""
        key = sample_key(rec, position)
        try:
            if not self.train and self.cache is not None:
                hit = self.cache.get(("sample", key))
                if hit is None:
                    p = geometry(rec, False, self.seed, 0, key, self.aug, self.stage)
                    want = crop_min_size(rec, p, self.size) if self.reduced_decode else None
                    dec = decode_record(rec, read_bytes(rec) if data is None else data,
                                        min_size=want, decoder=self.decoder)
                    hit = render_sample(rec, dec, p, self.size)
                    self.cache.put(("sample", key), hit)
                return dict(hit)
            p = geometry(rec, self.train, self.seed, epoch, key, self.aug, self.stage)
            return render_sample(rec, self._decoded(rec, data, p, key), p, self.size)
        except ManifestError as exc:
            if not self.skip_bad:
                raise
            log.debug("skipping %s", exc)
            return None

    def batch(self, records: Sequence[dict], epoch: int, positions: Sequence[int]) -> dict:
        """:func:`collate` of the samples of ``records`` (uint8 images) with ``indices``."""
        samples = [self.sample(r, epoch, int(i)) for r, i in zip(records, positions)]
        out = collate(samples)
        out["indices"] = [int(i) for i, s in zip(positions, samples) if s is not None]
        return out


def finish_batch(batch: dict, *, tokenizer: Tokenizer | None = None,
                 device: str | torch.device | None = None, mean=CLIP_MEAN, std=CLIP_STD) -> dict:
    """In place: uint8 images -> float32 normalised (on ``device`` when given: a 4x smaller
    host-to-device copy than float32), token tensors when ``tokenizer``; returns ``batch``."""
    imgs = batch["images"]
    if imgs.dtype == torch.uint8:
        if device is not None and torch.device(device) != imgs.device:
            imgs = imgs.to(device, non_blocking=True)
        batch["images"] = normalize_uint8_batch(imgs, mean, std) if imgs.shape[0] else imgs.float()
    if tokenizer is not None:
        tokenize_batch(batch, tokenizer)
    return batch


def build_batch(records: Sequence[dict], *, image_size: int, train: bool = False,
                tokenizer: Tokenizer | None = None, seed: int = 0, stage: int = 0, epoch: int = 0,
                indices: Sequence[int] | None = None, aug: Augment | None = None,
                decoder: str = "auto", skip_bad: bool = False,
                device: str | torch.device | None = None) -> dict:
    """One batch of ``records`` (validated manifest records, as ``read_manifest`` returns them).

    Returns the batch format of docs/design.md section 5.4: ``images`` float32 [B, 3, S, S]
    (CLIP mean/std, on ``device`` when given), ``boxes`` float32 [B, Kmax, 4] in output pixels,
    ``box_counts`` int64 [B], ``texts``, ``region_texts``, ``labels``, ``region_labels``,
    ``meta``, ``indices`` (of the kept records), ``skipped`` (records dropped as bad with
    ``skip_bad``); with ``tokenizer`` also ``text_ids`` / ``text_mask`` [B, L] and
    ``region_text_ids`` / ``region_text_mask`` [sum(box_counts), L].

    ``indices``: each record's index (default ``0..B-1``), the key its geometry is drawn from
    when the record has no manifest line. Without ``skip_bad`` a bad record raises
    :class:`ManifestError` naming its file and line.
    """
    if not isinstance(image_size, int) or image_size <= 0:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    idx = list(range(len(records))) if indices is None else list(indices)
    if len(idx) != len(records):
        raise ValueError(f"indices has {len(idx)} entries for {len(records)} records")
    maker = SampleMaker(image_size=image_size, train=train, seed=seed, stage=stage, aug=aug,
                        decoder=decoder, skip_bad=skip_bad)
    out = maker.batch(records, epoch, idx)
    out["skipped"] = int(out.pop("_skipped"))
    return finish_batch(out, tokenizer=tokenizer, device=device)
