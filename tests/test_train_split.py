"""One split rule for training and evaluation: ``regionmed-fast train --data D`` then
``regionmed-fast eval --data D --split test`` on a manifest without ``split`` fields never score
an image the run trained on, and a patient never straddles the two."""
from __future__ import annotations

import json
import os
import subprocess

from regionmed_fast.data.manifest import read_manifest
from regionmed_fast.data.split import select_split
from regionmed_fast.data.synthetic import write_dataset

from train_helpers import cli, env, run_dict, train_cmd, write_yaml


def _without_split(root: str) -> None:
    """Drop every record's ``split``; give each 3 consecutive images one ``patient_id``."""
    path = os.path.join(root, "annotations.jsonl")
    recs = [json.loads(ln) for ln in open(path) if ln.strip()]
    for i, r in enumerate(recs):
        r.pop("split", None)
        r["patient_id"] = f"p{i // 3}"
    with open(path, "w") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in recs))


def test_cli_train_then_eval_test_split_are_disjoint(tmp_path):
    data = str(tmp_path / "data")
    write_dataset(data, n=60, size=32, seed=3)
    _without_split(data)
    run = run_dict(save_every=100, stages=[{"name": "global", "steps": 12, "losses": {"global": 1.0}}])
    out = str(tmp_path / "run")
    tr = subprocess.run(train_cmd(write_yaml(tmp_path / "s.yaml", run), data, out), env=env(),
                        capture_output=True, text=True, timeout=240)
    assert tr.returncode == 0, tr.stderr[-3000:]
    ev = subprocess.run(cli("eval", "--model", os.path.join(out, "model"), "--data", data,
                            "--split", "test", "--tasks", "retrieval", "--json"),
                        env=env(), capture_output=True, text=True, timeout=240)
    assert ev.returncode == 0, ev.stderr[-3000:]
    scored = json.loads(ev.stdout[ev.stdout.index("{"):])

    recs = read_manifest(data)
    rule = scored["split_rule"]
    test = {r["image"] for r in select_split(recs, "test", group_key=rule["group_key"],
                                             test_fraction=rule["test_fraction"],
                                             val_fraction=rule["val_fraction"])}
    train = {r["image"] for r in select_split(recs, "train", group_key=rule["group_key"],
                                              test_fraction=rule["test_fraction"],
                                              val_fraction=rule["val_fraction"])}
    assert test and scored["n_images"] == len(test)  # eval scored exactly the test split
    seen = set(open(os.path.join(out, "train_images.txt")).read().splitlines())
    assert seen and not seen & test, sorted(seen & test)  # the trainer never saw a test image
    assert seen <= train and len(seen) >= 0.8 * len(train)
    patient = {r["image"]: r["patient_id"] for r in recs}
    assert not {patient[i] for i in seen} & {patient[i] for i in test}
