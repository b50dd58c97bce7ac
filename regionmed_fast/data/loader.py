"""``make_loader``: batches in the format of INTERFACES.md from a dataset folder or shards.

Backends:
  "cpu"   torch DataLoader, ``num_workers`` processes: simplejpeg decode (reduced-size where
          the crop allows), torch's uint8 antialiased crop+resize, flip; uint8 [B, 3, S, S]
          batches cross the process boundary and are normalised in the main process (on
          ``device`` when one is given, e.g. "cuda": a 4x smaller host-to-device copy).
  "dali"  NVIDIA DALI: ``fn.decoders.image(device="mixed")`` on a GPU (CPU decode with
          ``device_id=None`` where there is none), crop/resize/flip/normalise in the pipeline,
          boxes computed on the host by the same code as "cpu" (identical geometry).
  "auto"  "dali" when a CUDA GPU is present and DALI is installed, else "cpu".
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .manifest import ManifestError, ManifestReport, read_manifest
from .sample import collate, load_sample, read_bytes
from .text import tokenize_batch
from .transforms import CLIP_MEAN, CLIP_STD, TRAIN_SCALE, Augment, normalize_uint8_batch

log = logging.getLogger("regionmed_fast.data")


def dist_info(distributed: bool | None) -> tuple[int, int]:
    """(rank, world_size): from torch.distributed when ``distributed`` is None/True and it is
    initialised; (0, 1) when False. True without an initialised group is an error."""
    init = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed is True and not init:
        raise RuntimeError("distributed=True but torch.distributed is not initialised")
    if distributed is False or not init:
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


class EpochSampler(Sampler):
    """Yields ``(index, epoch)`` so workers draw each sample's geometry from (seed, epoch,
    index) whatever process handles it. Shuffles per epoch with ``seed + epoch``; splits by rank
    like DistributedSampler (padding by wrapping unless ``drop_last``)."""

    def __init__(self, n: int, *, shuffle: bool, seed: int, rank: int = 0, world: int = 1,
                 drop_last: bool = False):
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.rank, self.world, self.drop_last = rank, world, drop_last
        self.epoch = 0

    def _per_rank(self) -> int:
        if self.world == 1:
            return self.n
        return self.n // self.world if self.drop_last else math.ceil(self.n / self.world)

    def __len__(self) -> int:
        return self._per_rank()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = self._per_rank() * self.world
        if total > len(order) and order:
            order = (order * math.ceil(total / len(order)))[:total]
        order = order[:total][self.rank::self.world]
        epoch = self.epoch
        return iter([(i, epoch) for i in order])


class ManifestDataset(Dataset):
    """Map-style dataset over validated records; ``ds[(index, epoch)]`` -> sample dict, or
    None for a bad image when ``skip_bad`` (counted by the collate function)."""

    def __init__(self, records: list[dict], *, image_size: int, train: bool, seed: int = 0,
                 skip_bad: bool = False, decoder: str = "auto", reduced_decode: bool = True,
                 aug: Augment | None = None):
        self.records, self.size, self.train, self.seed = records, image_size, train, seed
        self.aug = aug
        self.skip_bad, self.decoder, self.reduced_decode = skip_bad, decoder, reduced_decode

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        rec = self.records[index]
        try:
            return load_sample(rec, read_bytes(rec), size=self.size, train=self.train,
                               seed=self.seed, epoch=epoch, index=index, decoder=self.decoder,
                               reduced_decode=self.reduced_decode, aug=self.aug)
        except ManifestError as exc:
            if self.skip_bad:
                log.debug("skipping %s", exc)
                return None
            raise


class Loader:
    """Iterable of batches with ``len()``; normalises images (float32 [B, 3, S, S]) and adds
    token tensors in the main process. ``skipped`` counts bad records skipped so far (manifest
    + decode); each epoch's count is logged at its end. ``set_epoch(e)`` picks the epoch's
    shuffle and crops; without it each full pass advances the epoch by one."""

    def __init__(self, batches, n_batches: int, *, tokenizer=None, manifest_skipped: int = 0,
                 normalize: bool = True, sampler=None, name: str = "", backend: str = "cpu",
                 mean=CLIP_MEAN, std=CLIP_STD, device: str | None = None):
        self._batches, self._len, self.tokenizer = batches, n_batches, tokenizer
        self.manifest_skipped, self.skipped = manifest_skipped, manifest_skipped
        self.normalize, self.sampler, self.name, self.backend = normalize, sampler, name, backend
        self.mean, self.std = mean, std
        self.device = torch.device(device) if device is not None else None
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self._len

    def _set_source_epoch(self) -> None:
        for obj in (self.sampler, getattr(self._batches, "dataset", None), self._batches):
            if obj is not None and hasattr(obj, "epoch") and obj is not self:
                obj.epoch = self.epoch

    def __iter__(self) -> Iterator[dict]:
        self._set_source_epoch()
        epoch_skipped = 0
        for batch in self._batches:
            epoch_skipped += int(batch.pop("_skipped", 0))
            if len(batch["texts"]) == 0:
                continue
            if self.normalize and batch["images"].dtype == torch.uint8:
                imgs = batch["images"]
                if self.device is not None and self.device != imgs.device:
                    imgs = imgs.to(self.device, non_blocking=True)
                batch["images"] = normalize_uint8_batch(imgs, self.mean, self.std)
            if self.tokenizer is not None:
                tokenize_batch(batch, self.tokenizer)
            yield batch
        self.skipped += epoch_skipped
        total = epoch_skipped + self.manifest_skipped
        if total:
            log.warning("%s epoch %d: skipped %d bad record(s) (%d in the manifest, %d at decode)",
                        self.name, self.epoch, total, self.manifest_skipped, epoch_skipped)
        self.epoch += 1


def _resolve_backend(backend: str) -> str:
    if backend not in ("auto", "cpu", "dali"):
        raise ValueError(f"backend must be 'auto', 'cpu' or 'dali', got {backend!r}")
    if backend == "auto":
        if torch.cuda.is_available():
            try:
                import nvidia.dali  # noqa: F401

                return "dali"
            except Exception:
                pass
        return "cpu"
    return backend


def make_loader(root_or_shards: str, *, image_size: int, batch_size: int, train: bool,
                tokenizer: Callable | None = None, backend: str = "auto", num_workers: int = 2,
                seed: int = 0, skip_bad: bool = False, shuffle: bool | None = None,
                drop_last: bool | None = None, distributed: bool | None = None,
                decoder: str = "auto", device: str | None = None, flip_p: float = 0.5,
                scale: tuple[float, float] = TRAIN_SCALE, split: str | None = None) -> Loader:
    """Batches of a dataset folder (``annotations.jsonl`` + images) or of WebDataset shards
    (a folder holding ``shards.json`` written by ``regionmed-fast shard``, or one .tar file).

    Batch (INTERFACES.md): ``images`` float32 [B, 3, S, S] (CLIP mean/std), ``boxes`` float32
    [B, Kmax, 4] in output pixels (zero padded), ``box_counts`` int64 [B], ``texts``,
    ``region_texts``, ``labels``, ``region_labels``, ``meta``; with ``tokenizer``, also
    ``text_ids``/``text_mask`` [B, L] and ``region_text_ids``/``region_text_mask``
    [sum(box_counts), L]. ``train``: random resized crop + flip (else the whole image resized);
    shuffle and drop_last default to ``train``. ``skip_bad``: skip and count bad records instead
    of raising (file:line). ``distributed``: None = split by rank when torch.distributed is
    initialised. ``device``: where images are delivered (DALI: default the current GPU;
    CPU path: default the CPU, or e.g. "cuda" to copy uint8 and normalise there).
    ``flip_p`` / ``scale``: training flip probability and crop-area range (see transforms).
    ``split``: keep only records whose ``split`` field equals it (no field counts as "train";
    folders only).
    """
    if not isinstance(image_size, int) or image_size <= 0:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    aug = Augment(scale=tuple(scale), flip_p=float(flip_p))
    shuffle = train if shuffle is None else shuffle
    drop_last = train if drop_last is None else drop_last
    rank, world = dist_info(distributed)
    auto = backend == "auto"
    backend = _resolve_backend(backend)
    root = os.fspath(root_or_shards)
    from .shards import is_shard_source

    if is_shard_source(root):
        if backend == "dali":
            log.info("shards are read by the CPU path (DALI reads dataset folders)")
        from .shards import make_shard_loader

        return make_shard_loader(root, image_size=image_size, batch_size=batch_size, train=train,
                                 tokenizer=tokenizer, num_workers=num_workers, seed=seed,
                                 skip_bad=skip_bad, shuffle=shuffle, drop_last=drop_last,
                                 rank=rank, world=world, decoder=decoder, aug=aug,
                                 device=None if device in (None, "cpu") else device)
    report = ManifestReport()
    records = read_manifest(root, skip_bad=skip_bad, report=report)
    if split is not None:
        records = [r for r in records if r.get("split", "train") == split]
    if not records:
        raise ValueError(f"{root}: no usable records ({report.skipped} skipped of {report.lines}"
                         + (f", split={split!r}" if split is not None else "") + ")")
    if backend == "dali":
        from .dali import make_dali_loader

        try:
            return make_dali_loader(records, image_size=image_size, batch_size=batch_size,
                                    train=train, tokenizer=tokenizer, num_workers=num_workers,
                                    seed=seed, skip_bad=skip_bad, shuffle=shuffle,
                                    drop_last=drop_last, rank=rank, world=world, device=device,
                                    manifest_skipped=report.skipped, name=root, aug=aug)
        except Exception as exc:
            if not auto:
                raise
            log.warning("DALI pipeline could not be built (%s: %s); using the CPU path",
                        type(exc).__name__, exc)
    ds = ManifestDataset(records, image_size=image_size, train=train, seed=seed,
                         skip_bad=skip_bad, decoder=decoder, aug=aug)
    sampler = EpochSampler(len(records), shuffle=shuffle, seed=seed, rank=rank, world=world,
                           drop_last=drop_last)
    dl = DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                    collate_fn=collate, drop_last=drop_last,
                    persistent_workers=num_workers > 0,
                    prefetch_factor=4 if num_workers > 0 else None,
                    pin_memory=torch.cuda.is_available())
    return Loader(dl, len(dl), tokenizer=tokenizer, manifest_skipped=report.skipped,
                  sampler=sampler, name=root, backend="cpu", device=device)
