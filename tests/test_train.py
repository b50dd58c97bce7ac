"""Progressive trainer: stage files, DDP equivalence, SIGKILL + resume, NaN stop, config
mismatch, and a tiny model that learns the synthetic phantoms. Small shapes throughout (2 cores)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from regionmed_fast.train import checkpoint as ckpt
from regionmed_fast.train.stages import StageFileError, load_run, parse_run

from train_helpers import MODEL_ARGS, env, max_diff, run_dict, train_cmd, weights, write_yaml


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> str:
    from regionmed_fast.data.synthetic import write_dataset

    root = tmp_path_factory.mktemp("synth")
    write_dataset(root, n=96, size=32, seed=0)
    return str(root)


# ---------------------------------------------------------------- stage files
def test_stage_file_yaml_toml_and_errors(tmp_path):
    cfg = load_run(write_yaml(tmp_path / "s.yaml", run_dict()))
    assert [s.name for s in cfg.stages] == ["global", "region", "hierarchical"]
    assert cfg.stages[2].needs_regions() and not cfg.stages[0].needs_regions()
    toml = tmp_path / "s.toml"
    toml.write_text(textwrap.dedent("""
        batch_size = 16
        [[stages]]
        name = "global"
        epochs = 1.5
        losses = {global = 1.0}
        warmup = 10
    """))
    t = load_run(toml)
    assert t.batch_size == 16 and t.stages[0].epochs == 1.5 and t.stages[0].warmup_steps(100) == 10
    base = cfg.as_baseline()
    assert all(set(s.losses) == {"global"} for s in base.stages) and base.baseline == "global"
    assert [s.steps for s in base.stages] == [s.steps for s in cfg.stages]
    bad = [({"stages": [{"name": "a", "steps": 1, "epochs": 1, "losses": {"global": 1}}]}, "exactly one"),
           ({"stages": [{"name": "a", "steps": 1, "losses": {"globl": 1}}]}, "unknown loss"),
           ({"stages": [{"name": "a", "steps": 1, "losses": {"global": 1}, "lr_max": 2}]}, "lr_max"),
           ({"batch": 3, "stages": [{"name": "a", "steps": 1, "losses": {"global": 1}}]}, "batch"),
           ({"stages": [{"name": "a", "steps": 0, "losses": {"global": 1}}]}, "steps must be > 0")]
    for raw, msg in bad:
        with pytest.raises(StageFileError, match=msg):
            parse_run(raw, "x.yaml")


def test_lr_schedule_warmup_then_cosine():
    from regionmed_fast.train.trainer import lr_at

    st = parse_run(run_dict()).stages[0]
    st.warmup, st.min_lr_ratio = 4, 0.1
    lrs = [lr_at(st, i, 20, 1.0) for i in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:])) and lrs[-1] >= 0.1


# ---------------------------------------------------------------- DDP
_DDP_SCRIPT = """
import sys, torch
from regionmed_fast.train.stages import load_run
from regionmed_fast.train.trainer import Trainer, build_model
cfg = load_run(sys.argv[1])
torch.manual_seed(cfg.seed)
model, tok = build_model(cfg)
for m in model.modules():  # dropout draws differ between 1 and 2 processes by construction
    if isinstance(m, torch.nn.Dropout):
        m.p = 0.0
tr = Trainer(cfg, sys.argv[2], sys.argv[3], model=model, tokenizer=tok, progress=False, verbose=False,
             tensorboard=False)
tr.fit()
tr.close()
# a process group kept alive past close() aborts the rank at exit, but only now and then
import os
left = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
assert not [n for n in left if "gloo" in n], left
"""


def _one_and_two_processes(tmp_path, run: dict, data: str) -> tuple[dict, dict]:
    """The final checkpoints of ``run`` on ``data`` trained by 1 process and by 2 gloo ranks."""
    script = tmp_path / "ddp.py"
    script.write_text(_DDP_SCRIPT)
    cfg = write_yaml(tmp_path / "s.yaml", run)
    one = subprocess.run([sys.executable, str(script), cfg, data, str(tmp_path / "one")],
                         env=env(), capture_output=True, text=True, timeout=240)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--standalone", str(script), cfg, data, str(tmp_path / "two")],
                         env=env(), capture_output=True, text=True, timeout=240)
    assert two.returncode == 0, two.stderr[-3000:]
    a = ckpt.load(str(tmp_path / "one" / "checkpoints" / "last.pt"))
    b = ckpt.load(str(tmp_path / "two" / "checkpoints" / "last.pt"))
    assert b["world_size"] == 2 and a["world_size"] == 1
    return a, b


def _same_run(a: dict, b: dict, steps: int) -> None:
    la, lb = [h["loss"] for h in a["history"]], [h["loss"] for h in b["history"]]
    assert len(la) == len(lb) == steps
    assert max(abs(x - y) for x, y in zip(la, lb)) < 1e-4, (la, lb)
    assert max_diff(a["model"], b["model"]) < 1e-4


def test_ddp_two_gloo_processes_equal_single_process(tmp_path, synth):
    a, b = _one_and_two_processes(tmp_path, run_dict(save_every=100), synth)
    _same_run(a, b, 10)


def test_ddp_rank_without_boxes_beside_a_rank_with_some(tmp_path):
    """Global batch 2 of a 2-image set, one image with boxes and one without: in every batch
    one rank's shard has regions and the other's none; the region loss runs on both ranks and
    the run equals the 1-process run."""
    from data_helpers import record, write_dataset, write_image

    root = str(tmp_path / "data")
    for name in ("a.jpg", "b.jpg"):
        write_image(f"{root}/images/{name}", 32, 32, box=(4, 4, 28, 28))
    write_dataset(root, [record("a.jpg", 32, 32, boxes=[(2, 2, 18, 18), (12, 12, 30, 30)], text="one",
                                split="train"),
                         record("b.jpg", 32, 32, boxes=[], text="two", split="train")])
    run = run_dict(batch_size=2, save_every=100, stages=[
        {"name": "region", "steps": 3, "losses": {"global": 1.0, "region": 1.0}}])
    a, b = _one_and_two_processes(tmp_path, run, root)
    assert all(h["loss_region"] > 0 for h in a["history"])
    _same_run(a, b, 3)


# ---------------------------------------------------------------- SIGKILL + resume
def test_sigkill_mid_stage_then_resume_gives_sameweights(tmp_path, synth):
    # the frozen-text feature cache (model/text_cache.py) encodes each text in the batch where it
    # is first seen, so a resumed process, which sees texts first in other batches, gets its
    # cached features rounded differently (1.5e-6 in the weights after 20 steps); off, resume is
    # bit-exact, and that is what this test holds the trainer to
    d = run_dict(save_every=2, model_args={**MODEL_ARGS, "text": {"name": "tiny",
                                                                  "cache_when_frozen": False}})
    d["stages"][1]["steps"] = 14  # a long middle stage to be killed in
    cfg = write_yaml(tmp_path / "s.yaml", d)
    full = subprocess.run(train_cmd(cfg, synth, str(tmp_path / "full")), env=env(),
                          capture_output=True, text=True, timeout=240)
    assert full.returncode == 0, full.stderr[-3000:]

    out = tmp_path / "killed"
    log = out / "train_log.jsonl"
    proc = subprocess.Popen(train_cmd(cfg, synth, str(out)), env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 200
    try:
        while time.time() < deadline and proc.poll() is None:
            lines = log.read_text().splitlines() if log.exists() else []
            if any(json.loads(ln)["stage_index"] == 1 and json.loads(ln)["step"] >= 5
                   for ln in lines if ln.strip()):
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.005)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed mid-stage"
    state = ckpt.load(str(out / "checkpoints" / "last.pt"))
    pos = state["position"]
    assert pos["stage"] == 1 and 0 < pos["step"] < 14, pos  # really mid-stage

    resumed = subprocess.run(train_cmd(cfg, synth, str(out), "--resume"), env=env(),
                             capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    a = weights(str(tmp_path / "full" / "checkpoints" / "last.pt"))
    b = weights(str(out / "checkpoints" / "last.pt"))
    assert max_diff(a, b) == 0.0
    # the log holds each step exactly once
    steps = [json.loads(ln)["global_step"] for ln in log.read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 3 + 14 + 3
    assert os.path.isfile(out / "model" / "config.json")  # save_pretrained at the end


# ---------------------------------------------------------------- failures with clear errors
def test_nan_loss_stops_naming_the_step(tmp_path, synth):
    from regionmed_fast.train.trainer import NonFiniteLossError, Trainer, build_model

    cfg = parse_run(run_dict())
    model, tok = build_model(cfg)
    calls = {"n": 0}
    forward = model.forward

    def poisoned(batch):
        out = forward(batch)
        calls["n"] += 1
        if calls["n"] == 3:  # the third optimizer step
            out["image_global"] = out["image_global"] * float("nan")
        return out

    model.forward = poisoned
    tr = Trainer(cfg, synth, str(tmp_path / "run"), model=model, tokenizer=tok, progress=False,
                 verbose=False, tensorboard=False)
    with pytest.raises(NonFiniteLossError, match=r"step 3 of 3 .*global step 3.*epoch 0 batch 2") as ei:
        tr.fit()
    assert "images/" in str(ei.value)  # names the batch's images


def test_checkpoint_of_another_config_is_refused(tmp_path, synth):
    from regionmed_fast.train.checkpoint import CheckpointMismatchError
    from regionmed_fast.train.trainer import Trainer

    small = run_dict(stages=[{"name": "global", "steps": 1, "losses": {"global": 1.0}}])
    out = str(tmp_path / "run")
    Trainer(parse_run(small), synth, out, progress=False, verbose=False, tensorboard=False).fit()
    other = dict(small, batch_size=16)
    with pytest.raises(CheckpointMismatchError, match=r"batch_size: checkpoint has 8, this run has 16"):
        Trainer(parse_run(other), synth, out, resume=True, progress=False, verbose=False)
    rc = subprocess.run(train_cmd(write_yaml(tmp_path / "o.yaml", other), synth, out, "--resume"),
                        env=env(), capture_output=True, text=True, timeout=120)
    assert rc.returncode == 2 and "another config" in rc.stderr


# ---------------------------------------------------------------- it learns
def test_tiny_model_learns_synthetic_data_far_above_chance(tmp_path):
    from regionmed_fast.data.manifest import read_manifest
    from regionmed_fast.data.split import select_split
    from regionmed_fast.data.synthetic import write_dataset
    from regionmed_fast.eval.embed import embed_split
    from regionmed_fast.eval.retrieval import evaluate_retrieval
    from regionmed_fast.train.trainer import Trainer

    root = str(tmp_path / "data")
    write_dataset(root, n=360, size=32, seed=1)
    # the pretrained MiniLM text tower, frozen: a random-init text tower needs far more steps
    small_vit = {"image_size": 32, "embed_dim": 64,
                 "vision": {"patch_size": 8, "width": 64, "depth": 2, "heads": 2}}
    cfg = parse_run(run_dict(model_args=small_vit, batch_size=32, lr=2e-3, log_every=10,
                             save_every=1000, stages=[
        {"name": "global", "steps": 70, "losses": {"global": 1.0}, "warmup": 5, "frozen": ["text", "text_proj"]}]))
    tr = Trainer(cfg, root, str(tmp_path / "run"), progress=False, verbose=False, tensorboard=False)
    summary = tr.fit()
    hist = summary["history"]
    assert hist[-1]["loss_global"] < hist[0]["loss_global"] - 0.5
    recs = select_split(read_manifest(root), "test")  # held-out images and texts
    es = embed_split(tr.model, recs, 32)
    res = evaluate_retrieval(es, tr.model, tr.tokenizer, es.rows())
    chance = 10 / res["n_unique_texts"]  # R@10 of a random ranking (64 texts here)
    r10 = (res["image_to_text"]["global"]["R@10"] + res["text_to_image"]["global"]["R@10"]) / 2
    assert r10 > 2 * chance, (res["image_to_text"]["global"], res["text_to_image"]["global"], chance)
