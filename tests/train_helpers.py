"""Shared pieces of the trainer tests: a very small model, stage dicts, subprocess runs."""
from __future__ import annotations

import os
import sys

import torch

from regionmed_fast.train import checkpoint as ckpt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a very small RegionMed-CLIP: 32 px, 8 px patches, tiny random-init text tower
MODEL_ARGS = {"image_size": 32, "text": "tiny", "embed_dim": 64,
              "vision": {"patch_size": 8, "width": 64, "depth": 2, "heads": 2}}


def run_dict(**over) -> dict:
    """A three-stage run of the very small model on 32 px images, batch 8, 1 worker."""
    d = {"model": "regionmed-tiny", "model_args": MODEL_ARGS, "image_size": 32, "batch_size": 8,
         "lr": 1e-3, "log_every": 1, "save_every": 2, "precision": "fp32", "num_workers": 1,
         "stages": [
             {"name": "global", "steps": 3, "losses": {"global": 1.0}},
             {"name": "region", "steps": 4, "losses": {"global": 1.0, "region": 1.0},
              "frozen": ["text"]},
             {"name": "hierarchical", "steps": 3,
              "losses": {"global": 1.0, "region": 1.0, "fused": 1.0}, "hard_negative_beta": 0.5}]}
    d.update(over)
    return d


def write_yaml(path, d: dict) -> str:
    import yaml

    with open(path, "w") as fh:
        yaml.safe_dump(d, fh)
    return str(path)


def env() -> dict:
    """The environment of a subprocess run of this checkout."""
    e = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
             OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    e.pop("TRITON_INTERPRET", None)
    return e


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "regionmed_fast.cli", *args]


def train_cmd(cfg: str, data: str, out: str, *extra: str) -> list[str]:
    return cli("train", "--config", cfg, "--data", data, "--out", out, "--no-progress", *extra)


def weights(path: str) -> dict[str, torch.Tensor]:
    return ckpt.load(path)["model"]


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].numel())
