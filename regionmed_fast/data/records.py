"""The records a loader reads, packed so that memory does not grow with Python objects per
record: one byte buffer of JSON lines and an offsets array (no per-record dict, so DataLoader
workers forked from the main process share the pages instead of copying them as refcounts
change).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterable

import numpy as np

from .manifest import ManifestError, ManifestReport, iter_manifest, manifest_path
from .split import TEST_FRACTION, VAL_FRACTION, check_fractions, record_split, normalize_split_name

log = logging.getLogger("regionmed_fast.data")


class RecordStore:
    """Read-only sequence of records (dicts), stored as JSON bytes; ``store[i]`` parses one."""

    def __init__(self, records: Iterable[dict] = ()):
        buf, ends = bytearray(), []
        for rec in records:
            buf += json.dumps(rec, ensure_ascii=False, separators=(",", ":")).encode()
            ends.append(len(buf))
        self._set(buf, ends)

    def _set(self, buf, ends) -> None:
        self._buf = np.frombuffer(bytes(buf), dtype=np.uint8)
        self._ends = np.asarray(ends, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        start = int(self._ends[i - 1]) if i else 0
        return json.loads(self._buf[start:int(self._ends[i])].tobytes())

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @property
    def nbytes(self) -> int:
        return self._buf.nbytes + self._ends.nbytes


def wanted_split(split) -> set[str] | None:
    if split is None or split == "all":
        return None
    names = [split] if isinstance(split, str) else list(split)
    return {normalize_split_name(s, "split") for s in names}


def read_store(root: str, *, skip_bad: bool = False, split=None, group_key: str | None = None,
               test_fraction: float = TEST_FRACTION, val_fraction: float = VAL_FRACTION,
               images: str = "exists", report: ManifestReport | None = None) -> RecordStore:
    """The records of ``root``'s manifest in ``split`` (data/split.py's rule, the one evaluation
    uses; ``None``/``"all"``: every record), packed. Records are checked as by
    ``read_manifest`` with ``images`` ("exists": the file is there; its pixels are checked when
    decoded). The first record error raises :class:`ManifestError` unless ``skip_bad``; then
    bad records are counted in ``report.skipped``."""
    check_fractions(test_fraction, val_fraction)
    want = wanted_split(split)
    report = report if report is not None else ManifestReport()
    first = None

    def keep():
        nonlocal first
        for no, _, rec, probs in iter_manifest(root, images=images):
            report.lines += 1
            errors = [p for p in probs if p.is_error]
            if rec is None:
                if not skip_bad:
                    raise ManifestError(errors[0])
                report.skipped += 1
                first = first or errors[0]
                continue
            if want is None or record_split(rec, group_key=group_key, test_fraction=test_fraction,
                                            val_fraction=val_fraction) in want:
                yield rec

    store = RecordStore(keep())
    if report.skipped:
        log.warning("%s: skipped %d bad record(s) of %d; first: %s", manifest_path(root)[1],
                    report.skipped, report.lines, first)
    return store
