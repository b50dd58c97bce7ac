"""Training checkpoints hold tensors and plain containers only (read with weights_only=True;
anything else is refused, not unpickled), and the saved model carries what evaluation needs:
the image size it was trained at and the run's split rule."""
from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from regionmed_fast.train import checkpoint as ckpt
from regionmed_fast.train.stages import parse_run
from train_helpers import MODEL_ARGS, env, run_dict, train_cmd, write_yaml


class Payload:  # unpickling it would run a command
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One short two-stage run (32 px, then 48 px) with a val carve-out."""
    from regionmed_fast.data.synthetic import write_dataset
    from regionmed_fast.train.trainer import Trainer

    root = tmp_path_factory.mktemp("ckpt")
    data = str(root / "data")
    write_dataset(data, n=64, size=48, seed=0)
    cfg = parse_run(run_dict(num_workers=0, val_fraction=0.2, group_key="image", stages=[
        {"name": "a", "steps": 2, "losses": {"global": 1.0}},
        {"name": "b", "steps": 1, "image_size": 48, "losses": {"global": 1.0, "region": 1.0}}]))
    out = str(root / "run")
    Trainer(cfg, data, out, progress=False, verbose=False, tensorboard=False).fit()
    return {"data": data, "out": out, "cfg": cfg}


def test_checkpoint_loads_with_weights_only_and_resumes_rng(run):
    path = os.path.join(run["out"], "checkpoints", "last.pt")
    state = torch.load(path, map_location="cpu", weights_only=True)  # no error: plain contents
    assert state["format"] == ckpt.FORMAT_VERSION and state["position"] == {"stage": 2, "step": 0}
    assert isinstance(state["config"], dict) and isinstance(state["model_config"], dict)
    assert isinstance(state["rng"][0]["python"]["state"], torch.Tensor)
    # the RNG states round-trip: restoring gives the draws that followed the save
    import random

    import numpy as np

    saved = ckpt.rng_state()
    want = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    ckpt.set_rng_state(saved)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == want


def test_checkpoint_with_other_objects_is_refused_not_unpickled(tmp_path, run):
    from regionmed_fast.train.trainer import Trainer

    out = tmp_path / "evil"
    (out / "checkpoints").mkdir(parents=True)
    path = out / "checkpoints" / "last.pt"
    state = ckpt.load(os.path.join(run["out"], "checkpoints", "last.pt"))
    state["extra"] = Payload()
    torch.save(state, path)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(ckpt.UnsafeCheckpointError, match=r"refusing to load.*a posix.system"):
            ckpt.load(str(path))
        with pytest.raises(ckpt.UnsafeCheckpointError):
            Trainer(run["cfg"], run["data"], str(out), resume=True, progress=False, verbose=False,
                    tensorboard=False)
        cfg = write_yaml(tmp_path / "s.yaml", run_dict(num_workers=0, val_fraction=0.2,
                                                        group_key="image"))
        r = subprocess.run(train_cmd(cfg, run["data"], str(out), "--resume"), env=env(),
                           capture_output=True, text=True, timeout=120)
    finally:
        os.chdir(cwd)
    assert r.returncode == 2 and "refusing to load" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "PWNED").exists()


def test_saved_model_records_trained_image_size_and_split_rule(run):
    from regionmed_fast.eval.runner import load_model, model_image_size, split_settings

    folder = os.path.join(run["out"], "model")
    with open(os.path.join(folder, "config.json")) as fh:
        blob = json.load(fh)
    assert blob["config"]["trained_image_size"] == 48  # the last stage's size, not the model's 32
    assert MODEL_ARGS["image_size"] == 32
    model = load_model(run["out"])  # the run folder, as `regionmed-fast eval --model RUN` reads it
    assert model_image_size(model) == 48
    rule = split_settings(model)
    assert (rule["group_key"], rule["test_fraction"], rule["val_fraction"]) == ("image", 0.3, 0.2)
    assert set(rule["source"].values()) == {"model metadata"}
