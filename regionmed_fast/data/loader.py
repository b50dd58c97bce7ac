"""``make_loader``: the training and evaluation batches of a dataset folder or of WebDataset
shards, on one of three backends, all building batches with the one batch path
(``regionmed_fast.data.batch``):

  "cpu"   torch DataLoader worker processes (data/folder.py; shards: data/shards.py):
          simplejpeg decode (reduced-size where the crop allows), torch's uint8 antialiased
          crop+resize, flip; uint8 batches cross the process boundary and are normalised in
          the main process (on ``device`` when one is given).
  "dali"  NVIDIA DALI (data/dali.py): ``fn.decoders.image(device="mixed")`` on a GPU (CPU
          decode with ``device_id=None`` where there is none), crop/resize/flip/normalise in the
          pipeline; the host side of the batch is the CPU path's code. Dataset folders only.
  "auto"  "dali" when a CUDA GPU is present and DALI is installed, else "cpu".

The contract (docs/data.md, "Loader contract"; the order is data/order.py): ``batch_size`` is
per rank; global micro-batch ``j`` is a pure function of (seed, stage, epoch) and rank ``r`` of
``world`` takes its elements ``r::world``; ``loader.iterate(start, stop)`` yields ``(j, batch)``
across epochs and restarting at any ``j`` gives the batches an uninterrupted run gave.
"""
from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Callable, Iterator

import torch

from .batch import SampleMaker, finish_batch
from .dali import DaliSource, dali_available
from .folder import FolderSource
from .manifest import DataError, ManifestReport
from .order import Schedule
from .records import read_store
from .shards import ShardSource, is_shard_source, resolve, shard_counts
from .split import TEST_FRACTION, VAL_FRACTION
from .transforms import TRAIN_SCALE, Augment

log = logging.getLogger("regionmed_fast.data")
BACKENDS = ("auto", "cpu", "dali")


class Loader:
    """Batches of one stage for one rank (see the module docstring).

    ``batches_per_epoch``: this rank's batches per epoch; ``iterate(start, stop)``: ``(j,
    batch)`` for ``start <= j < stop``; iterating the loader itself yields the batches of epoch
    ``loader.epoch`` (``set_epoch``; each pass started advances it). ``bad_counts``: epoch ->
    records skipped (``skip_bad``: the manifest's bad records, which no epoch sees, plus those
    found when decoding in that epoch on this rank); logged once per epoch. ``backend``: "cpu" or
    "dali", what runs.
    """

    def __init__(self, source, *, tokenizer: Callable | None = None,
                 device: str | torch.device | None = None, name: str = "",
                 manifest_skipped: int = 0):
        self.source, self.tokenizer, self.name = source, tokenizer, name
        self.device = None if device is None else torch.device(device)
        self.backend = source.backend
        self.manifest_skipped = manifest_skipped
        self._decode_bad: dict[int, int] = defaultdict(int)
        self._logged: set[int] = set()
        self.epoch = 0

    @property
    def batches_per_epoch(self) -> int:
        return self.source.batches_per_epoch

    @property
    def bad_counts(self) -> dict[int, int]:
        return {e: self.manifest_skipped + n for e, n in sorted(self._decode_bad.items())}

    @property
    def skipped(self) -> int:
        """Bad records skipped so far: the manifest's, plus every one found when decoding."""
        return self.manifest_skipped + sum(self._decode_bad.values())

    def __len__(self) -> int:
        return self.source.epoch_batches(self.epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def epoch_start(self, epoch: int) -> int:
        """The stage's micro-batch index of the first batch of ``epoch``."""
        return sum(self.source.epoch_batches(e) for e in range(epoch))

    def iterate(self, start: int, stop: int) -> Iterator[tuple[int, dict]]:
        """``(j, batch)`` for global micro-batches ``start <= j < stop`` (across epochs)."""
        if start < 0 or stop < start:
            raise ValueError(f"iterate needs 0 <= start <= stop, got {start}, {stop}")
        if stop > start and self.source.epoch_batches(0) == 0:
            raise DataError(f"{self.name}: an epoch has no batch")
        for j, batch in self.source.raw(start, stop):
            if "_raise" in batch:
                raise batch["_raise"]
            epoch, b = self.source.locate(j)
            self._decode_bad[epoch] += int(batch.pop("_skipped", 0))
            finish_batch(batch, tokenizer=self.tokenizer, device=self.device)
            if b == self.source.epoch_batches(epoch) - 1:
                self._log_epoch(epoch)
            yield j, batch

    def _log_epoch(self, epoch: int) -> None:
        n = self._decode_bad[epoch]
        if epoch in self._logged or not (n or self.manifest_skipped):
            return
        self._logged.add(epoch)
        log.warning("%s epoch %d: skipped %d bad record(s) (%d in the manifest, %d at decode)",
                    self.name, epoch, n + self.manifest_skipped, self.manifest_skipped, n)

    def __iter__(self) -> Iterator[dict]:
        epoch, self.epoch = self.epoch, self.epoch + 1  # a pass started is a pass taken
        start = self.epoch_start(epoch)
        return (b for _, b in self.iterate(start, start + self.source.epoch_batches(epoch)))

    def close(self) -> None:
        """Stop worker processes now (they also stop when the loader is collected)."""
        self.source.close()


def resolve_backend(backend: str) -> str:
    """"cpu" or "dali" for ``backend`` ("auto": DALI when a CUDA GPU and DALI are present)."""
    if backend not in BACKENDS:
        raise DataError(f"backend must be 'auto', 'cpu' or 'dali', got {backend!r}")
    if backend == "auto":
        return "dali" if torch.cuda.is_available() and dali_available() else "cpu"
    return backend


def _check_args(image_size, batch_size, rank, world, num_workers, cache_mb) -> None:
    for name, v in (("image_size", image_size), ("batch_size", batch_size), ("world", world)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise DataError(f"{name} must be a positive int, got {v!r}")
    if not isinstance(rank, int) or not 0 <= rank < world:
        raise DataError(f"rank must be an int in [0, world={world}), got {rank!r}")
    if not isinstance(num_workers, int) or num_workers < 0:
        raise DataError(f"num_workers must be an int >= 0, got {num_workers!r}")
    if not isinstance(cache_mb, (int, float)) or cache_mb < 0:
        raise DataError(f"cache_mb must be a number >= 0, got {cache_mb!r}")


def make_loader(source: str, *, image_size: int, batch_size: int, train: bool,
                tokenizer: Callable | None = None, backend: str = "auto", num_workers: int = 2,
                seed: int = 0, stage: int = 0, rank: int = 0, world: int = 1,
                skip_bad: bool = False, cache_mb: float = 0, split=None,
                group_key: str | None = None, test_fraction: float = TEST_FRACTION,
                val_fraction: float = VAL_FRACTION, flip_p: float = 0.5,
                scale: tuple[float, float] = TRAIN_SCALE, device: str | torch.device | None = None,
                drop_last: bool | None = None, shuffle: bool | None = None,
                decoder: str = "auto", shuffle_buffer: int = 1000,
                epoch_samples: int | None = None, index: str | None = None) -> Loader:
    """The batches of ``source`` for one rank of one stage.

    ``source``: a dataset folder (``annotations.jsonl`` + images) or a ``.jsonl`` manifest in
    one; or WebDataset shards: a folder with ``shards.json`` (``regionmed-fast shard``), that
    file, ``.tar`` path(s) with braces (``shard-{000000..000009}.tar``), URLs or ``pipe:CMD``
    sources (data/shards.py; ``index``: a ``shards.json`` for sources it is not beside, and
    without any index ``epoch_samples`` = samples per epoch).

    Batch (docs/design.md section 5.4): ``images`` float32 [B, 3, S, S] (CLIP mean/std; on
    ``device`` when given, DALI: default the current GPU), ``boxes`` float32 [B, Kmax, 4] in
    output pixels (zero padded; Kmax may be 0), ``box_counts`` int64 [B], ``texts``,
    ``region_texts``, ``labels``, ``region_labels``, ``meta``, ``indices`` (records' positions
    in the split; shards: in the source manifest); with ``tokenizer`` also ``text_ids`` /
    ``text_mask`` [B, L] and ``region_text_ids`` / ``region_text_mask`` [sum(box_counts), L].

    Order: ``batch_size`` is per rank, a global micro-batch is ``batch_size * world`` records,
    rank ``rank`` gets its elements ``rank::world``; the order and every sample's crop and
    flip are pure functions of (``seed``, ``stage``, epoch, sample), so ``iterate`` restarts
    exactly anywhere and 2 processes equal 1. ``train``: box-aware random resized crop (area
    ``scale``, ratio 3/4-4/3) and horizontal flip with probability ``flip_p``, which swaps the
    side words of the texts (data/sides.py); else the whole image resized. ``shuffle`` and
    ``drop_last`` default to ``train``.

    ``split``: the records of that split (data/split.py's rule, the one evaluation uses:
    a record's own ``split`` field, else its ``group_key`` group hashed against
    ``test_fraction`` / ``val_fraction``); ``None``: every record. ``skip_bad``: skip bad
    records (manifest errors, undecodable images) and count them (``loader.bad_counts``,
    logged per epoch); without it the first one raises a one-line ``ManifestError`` naming
    file, line and problem. ``cache_mb``: decoded-sample cache per decoding process (0: none,
    streaming). ``num_workers``: DataLoader processes (CPU path) or DALI threads.
    """
    _check_args(image_size, batch_size, rank, world, num_workers, cache_mb)
    aug = Augment(scale=tuple(scale), flip_p=float(flip_p))
    shuffle = train if shuffle is None else bool(shuffle)
    drop_last = train if drop_last is None else bool(drop_last)
    auto = backend == "auto"
    backend = resolve_backend(backend)
    src = os.fspath(source)
    maker = SampleMaker(image_size=image_size, train=train, seed=seed, stage=stage, aug=aug,
                        decoder=decoder, skip_bad=skip_bad, cache_mb=cache_mb)
    pin = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
    split_kw = dict(split=split, group_key=group_key, test_fraction=test_fraction,
                    val_fraction=val_fraction)
    if is_shard_source(src):
        if backend == "dali" and not auto:
            log.info("shards are read by the CPU path (DALI reads dataset folders)")
        urls, idx, _ = resolve(src, index)
        counts = shard_counts(idx, urls, **split_kw)
        source_ = ShardSource(urls, counts, maker, batch_size=batch_size, seed=seed, stage=stage,
                              rank=rank, world=world, shuffle=shuffle, drop_last=drop_last,
                              num_workers=num_workers, buffer=shuffle_buffer,
                              epoch_samples=epoch_samples, pin_memory=pin, name=src, **split_kw)
        if source_.batches_per_epoch == 0:
            raise DataError(f"{src}: {source_.total} sample(s)"
                            + (f" in split {split!r}" if split is not None else "")
                            + f", fewer than one global batch ({batch_size} x {world} ranks)")
        return Loader(source_, tokenizer=tokenizer, device=device, name=src)
    report = ManifestReport()
    store = read_store(src, skip_bad=skip_bad, report=report, **split_kw)
    schedule = Schedule(len(store), batch_size=batch_size, seed=seed, stage=stage, rank=rank,
                        world=world, shuffle=shuffle, drop_last=drop_last)
    if schedule.batches_per_epoch == 0:
        where = f" in split {split!r}" if split is not None else ""
        raise DataError(f"{src}: {len(store)} usable record(s){where} ({report.skipped} skipped "
                        f"of {report.lines}), fewer than one global batch ({batch_size} x "
                        f"{world} ranks)")
    source_ = None
    if backend == "dali":
        dev = (torch.device(device) if device is not None else
               torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
               else torch.device("cpu"))
        try:
            source_ = DaliSource(store, schedule, maker, device=dev,
                                 num_threads=max(1, num_workers))
        except Exception as exc:
            if not auto:
                raise
            log.warning("DALI pipeline could not be built (%s: %s); using the CPU path",
                        type(exc).__name__, exc)
    if source_ is None:
        source_ = FolderSource(store, schedule, maker, num_workers=num_workers, pin_memory=pin)
    return Loader(source_, tokenizer=tokenizer, device=device, name=src,
                  manifest_skipped=report.skipped)
