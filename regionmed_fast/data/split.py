"""The one split rule of the project: which records are ``train``, ``val`` and ``test``.

The trainer, evaluation, the demo and the study all call :func:`select_split`, so a record that
``regionmed-fast train`` learns from is never one that ``regionmed-fast eval --split test``
scores.

Rule, per record:

1. A record with its own ``split`` field follows it (``"validation"`` and ``"valid"`` mean
   ``"val"``; ``"eval"`` means ``"test"``).
2. Otherwise the record's **group** decides: the value of ``group_key`` in the record
   (default :data:`DEFAULT_GROUP_KEYS`: ``patient_id`` where the record has one, else the image
   path), hashed with SHA-1 to ``u`` in ``[0, 1)``. ``u < test_fraction`` is ``test``,
   ``u < test_fraction + val_fraction`` is ``val``, the rest ``train``. Every record of a group
   lands on the same side, so one patient never straddles train and test.

``val`` is carved out of what would otherwise be training data (``val_fraction`` only moves
groups from ``train`` to ``val``; the test set does not change with it), so levers tuned on
``val`` never see ``test``.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

from regionmed_fast.errors import UserError

SPLITS = ("train", "val", "test")
#: Default share of groups (not records) that go to ``test``.
TEST_FRACTION = 0.3
#: Default share of groups carved out of training data as ``val``.
VAL_FRACTION = 0.0
#: Keys tried in order when no ``group_key`` is given; the image path is the last resort.
DEFAULT_GROUP_KEYS = ("patient_id",)

_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
            "validation": "val", "dev": "val", "test": "test", "eval": "test"}


class SplitError(UserError, ValueError):
    """An unknown split name, or fractions that leave nothing to train on."""


def normalize_split_name(name: str, where: str = "split") -> str:
    """``"validation"`` -> ``"val"`` etc.; an unknown name is an error naming ``where``."""
    key = str(name).strip().lower()
    if key not in _ALIASES:
        raise SplitError(f"{where}: unknown split {name!r}; expected one of {SPLITS} "
                         f"(or an alias: {sorted(set(_ALIASES) - set(SPLITS))})")
    return _ALIASES[key]


def group_of(rec: dict, group_key: str | None = None) -> str:
    """The value that decides ``rec``'s split: ``rec[group_key]`` (the image path when the
    record lacks it), or with ``group_key=None`` the first of :data:`DEFAULT_GROUP_KEYS` the
    record has, else its image path."""
    keys = (group_key,) if group_key else DEFAULT_GROUP_KEYS
    for k in keys:
        v = rec.get(k)
        if v is not None and v != "":
            return f"{k}={v}"
    return f"image={rec['image']}"


def group_hash(group: str) -> float:
    """``group`` -> a number in ``[0, 1)``, the same on every machine and Python version."""
    return int(hashlib.sha1(group.encode("utf-8")).hexdigest()[:13], 16) / float(16 ** 13)


def check_fractions(test_fraction: float, val_fraction: float) -> None:
    for name, v in (("test_fraction", test_fraction), ("val_fraction", val_fraction)):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0.0 <= v < 1.0:
            raise SplitError(f"{name} must be a number in [0, 1), got {v!r}")
    if test_fraction + val_fraction >= 1.0:
        raise SplitError(f"test_fraction + val_fraction must be < 1 (nothing left to train on), "
                         f"got {test_fraction} + {val_fraction}")


def record_split(rec: dict, *, group_key: str | None = None, test_fraction: float = TEST_FRACTION,
                 val_fraction: float = VAL_FRACTION) -> str:
    """``"train"``, ``"val"`` or ``"test"`` for one manifest record (see the module docstring)."""
    own = rec.get("split")
    if own is not None:
        where = f"{rec.get('_file', 'record')}:{rec.get('_line', '?')}: field 'split'"
        return normalize_split_name(own, where)
    u = group_hash(group_of(rec, group_key))
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def select_split(records: Sequence[dict], split: str | Iterable[str] | None, *,
                 group_key: str | None = None, test_fraction: float = TEST_FRACTION,
                 val_fraction: float = VAL_FRACTION) -> list[dict]:
    """The records of ``split`` (a name, several names, or ``None``/``"all"`` for every record),
    in manifest order."""
    check_fractions(test_fraction, val_fraction)
    if split is None or split == "all":
        return list(records)
    names = [split] if isinstance(split, str) else list(split)
    want = {normalize_split_name(s, "split") for s in names}
    return [r for r in records
            if record_split(r, group_key=group_key, test_fraction=test_fraction,
                            val_fraction=val_fraction) in want]


def split_counts(records: Sequence[dict], *, group_key: str | None = None,
                 test_fraction: float = TEST_FRACTION,
                 val_fraction: float = VAL_FRACTION) -> dict[str, int]:
    """Records per split (for logs and reports)."""
    check_fractions(test_fraction, val_fraction)
    out = dict.fromkeys(SPLITS, 0)
    for r in records:
        out[record_split(r, group_key=group_key, test_fraction=test_fraction,
                         val_fraction=val_fraction)] += 1
    return out
