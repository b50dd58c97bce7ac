"""The trainer's data stream: a fixed sample order that makes runs resumable and DDP-exact.

The order of stage ``s``, epoch ``e`` is a permutation seeded by ``(seed, s, e)``; global batch
``j`` is ``order[j*B:(j+1)*B]`` and DDP rank ``r`` of ``W`` takes every W-th sample of it. So
(i) the position in the data is just (stage, step), restored exactly on resume, and (ii) the
union of the ranks' batches is the single-process batch, which is what makes a 2-process run
equal a 1-process run. Samples are decoded by ``regionmed_fast.data`` (its ``make_loader``
shuffles by epoch only, so the trainer drives the same per-sample code with its own order);
with ``cache=True`` decoded, resized images are kept in memory (small sets such as the demo's).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

def read_records(root: str, split: str | None = None) -> list[dict]:
    """Validated manifest records of ``root`` (``regionmed_fast.data.manifest``), keeping those
    whose ``split`` equals ``split`` (records without one count as ``train``)."""
    from regionmed_fast.data.manifest import read_manifest

    records = read_manifest(root)
    if split is not None:
        records = [r for r in records if r.get("split", "train") == split]
    if not records:
        raise ValueError(f"{root}: no records" + (f" with split={split!r}" if split else ""))
    return records


class SampleReader:
    """Decode records into batches (INTERFACES.md format) with ``regionmed_fast.data``'s
    decoder, geometry and collate. No augmentation: the synthetic texts say "left"/"right", so
    a horizontal flip would make them wrong. ``cache=True`` keeps decoded uint8 samples."""

    def __init__(self, root: str, records: Sequence[dict], image_size: int, cache: bool = True):
        self.root, self.records, self.image_size, self.cache = root, list(records), image_size, cache
        self._cache: dict[int, dict] = {}

    def __len__(self) -> int:
        return len(self.records)

    def sample(self, i: int) -> dict:
        hit = self._cache.get(i)
        if hit is not None:
            return hit
        from regionmed_fast.data.sample import load_sample, read_bytes

        rec = self.records[i]
        s = load_sample(rec, read_bytes(rec), size=self.image_size, train=False, seed=0, epoch=0,
                        index=i)
        if self.cache:
            self._cache[i] = s
        return s

    def batch(self, indices: Sequence[int], tokenizer: Callable | None = None) -> dict:
        from regionmed_fast.data.sample import collate
        from regionmed_fast.data.text import tokenize_batch
        from regionmed_fast.data.transforms import normalize_uint8_batch

        out = collate([self.sample(i) for i in indices])
        out.pop("_skipped", None)
        out["images"] = normalize_uint8_batch(out["images"])
        out["indices"] = list(indices)
        if tokenizer is not None:
            tokenize_batch(out, tokenizer)
        return out


def epoch_order(n: int, seed: int, stage: int, epoch: int) -> torch.Tensor:
    """The sample order of one epoch of one stage (same on every rank)."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + stage * 10_007 + epoch) % (2**63))
    return torch.randperm(n, generator=g)


class StageStream:
    """Batches of one stage from global micro-batch ``start`` on, for this rank.

    ``batch_size`` is the global micro-batch; ``len(stream.batches_per_epoch)`` drops the
    last partial batch so every step has the same batch size (contrastive losses need it).
    """

    def __init__(self, reader: SampleReader, *, batch_size: int, seed: int, stage: int,
                 rank: int = 0, world: int = 1, tokenizer: Callable | None = None,
                 num_workers: int = 0):
        if batch_size % world:
            raise ValueError(f"batch_size={batch_size} must be divisible by the world size {world}")
        if len(reader) < batch_size:
            raise ValueError(f"the dataset has {len(reader)} samples, fewer than one batch "
                             f"(batch_size={batch_size})")
        self.reader, self.batch_size, self.seed, self.stage = reader, batch_size, seed, stage
        self.rank, self.world, self.tokenizer, self.num_workers = rank, world, tokenizer, num_workers
        self.batches_per_epoch = len(reader) // batch_size

    def indices(self, j: int) -> list[int]:
        """This rank's sample indices of global micro-batch ``j`` of the stage."""
        epoch, b = divmod(j, self.batches_per_epoch)
        order = epoch_order(len(self.reader), self.seed, self.stage, epoch)
        glob = order[b * self.batch_size:(b + 1) * self.batch_size]
        return glob[self.rank::self.world].tolist()

    def iterate(self, start: int, stop: int) -> Iterator[tuple[int, dict]]:
        """``(j, batch)`` for global micro-batches ``start <= j < stop``."""
        if self.num_workers <= 0:
            for j in range(start, stop):
                yield j, self.reader.batch(self.indices(j), self.tokenizer)
            return
        ds = _BatchDataset(self, start, stop)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=self.num_workers,
                                             persistent_workers=False, prefetch_factor=2)
        yield from zip(range(start, stop), loader)


class _BatchDataset(torch.utils.data.Dataset):
    def __init__(self, stream: StageStream, start: int, stop: int):
        self.stream, self.start, self.stop = stream, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> dict:
        s = self.stream
        return s.reader.batch(s.indices(self.start + i), s.tokenizer)
