"""The one split rule (regionmed_fast/data/split.py)."""
from __future__ import annotations

import pytest

from regionmed_fast.data.split import record_split, select_split, split_counts


def _recs(n: int, patients: int | None = None) -> list[dict]:
    out = []
    for i in range(n):
        r = {"image": f"images/{i:04d}.jpg"}
        if patients:
            r["patient_id"] = f"p{i % patients}"
        out.append(r)
    return out


def test_splits_partition_the_records_and_follow_the_fraction():
    recs = _recs(4000)
    tr, va, te = (select_split(recs, s, val_fraction=0.1) for s in ("train", "val", "test"))
    assert len(tr) + len(va) + len(te) == len(recs)
    ids = [{r["image"] for r in part} for part in (tr, va, te)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert abs(len(te) / 4000 - 0.3) < 0.03 and abs(len(va) / 4000 - 0.1) < 0.02


def test_val_is_carved_from_train_and_leaves_test_unchanged():
    recs = _recs(2000)
    te0 = select_split(recs, "test")
    te1 = select_split(recs, "test", val_fraction=0.2)
    assert te0 == te1
    tr0 = {r["image"] for r in select_split(recs, "train")}
    va1 = {r["image"] for r in select_split(recs, "val", val_fraction=0.2)}
    assert va1 and va1 <= tr0


def test_a_patient_never_straddles_splits():
    recs = _recs(600, patients=50)
    side = {}
    for r in recs:
        s = record_split(r)  # default group key: patient_id where present
        assert side.setdefault(r["patient_id"], s) == s
    assert len(set(side.values())) >= 2
    # an explicit image group key splits the same patient's images apart
    by_image = {record_split(r, group_key="image") for r in recs if r["patient_id"] == "p0"}
    assert len(by_image) >= 1


def test_own_split_field_wins_and_aliases_normalise():
    recs = [{"image": "a.jpg", "split": "validation"}, {"image": "b.jpg", "split": "TEST"},
            {"image": "c.jpg", "split": "train"}]
    assert [record_split(r) for r in recs] == ["val", "test", "train"]
    assert select_split(recs, "val") == recs[:1]
    assert split_counts(recs) == {"train": 1, "val": 1, "test": 1}
    with pytest.raises(ValueError, match=r"annotations.jsonl:7: field 'split'.*'holdout'"):
        record_split({"image": "d.jpg", "split": "holdout", "_file": "annotations.jsonl", "_line": 7})


def test_bad_fractions_and_names_are_errors():
    with pytest.raises(ValueError, match="test_fraction"):
        select_split(_recs(3), "test", test_fraction=1.0)
    with pytest.raises(ValueError, match="nothing left to train on"):
        select_split(_recs(3), "train", test_fraction=0.6, val_fraction=0.4)
    with pytest.raises(ValueError, match="unknown split 'tst'"):
        select_split(_recs(3), "tst")
    assert select_split(_recs(3), None) == _recs(3) == select_split(_recs(3), "all")
