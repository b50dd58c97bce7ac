"""The trainer end to end (bench_train.py ``--cases e2e,memory``).

``e2e``: ``Trainer.fit`` for N steps of the hierarchical stage on real JPEGs through the real
loader (worker processes and prefetch on the CPU path, DALI where it is installed and a GPU is
present: the loader's ``auto``), against the same steps fed from the same batches already in
device memory (``compute-only``). Figure: loader-inclusive samples/s over compute-only
samples/s, per worker count on the CPU path.

``memory``: peak memory of 200 training steps (tiny model, small batch) on a 2,000-image and on
a 20,000-image synthetic set (256 px JPEGs), each in a fresh process: the process's own peak
resident set (``VmHWM``), the largest worker's (``getrusage(RUSAGE_CHILDREN)``), and the peak of
the whole process tree's proportional set size sampled every 0.2 s (PSS counts a page shared by
the workers once, where summed RSS would count it in every process).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import torch

import runner

HERE = os.path.dirname(os.path.abspath(__file__))
DATA_CACHE = os.environ.get("REGIONMED_BENCH_DATA",
                            os.path.join(tempfile.gettempdir(), "regionmed-bench-data"))
TINY_ARGS = {"image_size": 64, "text": "tiny", "vision": {"patch_size": 8}}
E2E_GROUP = "trainer end to end"
MEM_GROUP = "trainer peak memory"


# ---------------------------------------------------------------- data
def _phantom_jpeg(job: tuple[str, int, int, int]) -> str:
    root, i, size, seed = job
    from PIL import Image

    from regionmed_fast.data.synthetic import make_example

    img, rec = make_example(i, size, seed)
    name = f"images/{i:06d}.jpg"
    Image.fromarray(img).save(os.path.join(root, name), quality=90)
    return json.dumps({"image": name, **rec})


def jpeg_synth(n: int, size: int, seed: int = 0) -> str:
    """A folder of ``n`` synthetic phantoms (the generator of ``regionmed-fast synth``,
    ``make_example``) stored as JPEG (quality 90), drawn on every core and cached under
    ``DATA_CACHE``. No ``split`` field: the trainer's split rule assigns ~70 % to train.
    Phantom ``i`` does not depend on ``n``, so a smaller set is a prefix (see
    :func:`prefix_set`)."""
    import multiprocessing as mp

    root = os.path.join(DATA_CACHE, f"synth-jpeg-{n}-{size}-{seed}")
    if os.path.isfile(os.path.join(root, "annotations.jsonl")):
        return root
    tmp = root + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, "images"))
    t0 = time.perf_counter()
    with mp.get_context("fork").Pool(os.cpu_count()) as pool:
        lines = pool.map(_phantom_jpeg, [(tmp, i, size, seed) for i in range(n)], chunksize=64)
    with open(os.path.join(tmp, "annotations.jsonl"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    os.replace(tmp, root)
    print(f"  wrote {n} synthetic {size} px JPEGs to {root} in {time.perf_counter() - t0:.0f} s "
          "(kept for later runs)", flush=True)
    return root


def prefix_set(root: str, n: int) -> str:
    """The first ``n`` records of ``root`` as a dataset folder (its images linked, not copied)."""
    sub = f"{root}-first{n}"
    if not os.path.isfile(os.path.join(sub, "annotations.jsonl")):
        os.makedirs(sub, exist_ok=True)
        if not os.path.exists(os.path.join(sub, "images")):
            os.symlink(os.path.join(root, "images"), os.path.join(sub, "images"))
        with open(os.path.join(root, "annotations.jsonl")) as fh:
            head = [next(fh) for _ in range(n)]
        with open(os.path.join(sub, "annotations.jsonl"), "w") as fh:
            fh.writelines(head)
    return sub


# ---------------------------------------------------------------- the runs
def run_config(model: str, model_args: dict, size: int, batch: int, steps: int, workers: int,
               loader: str, device: str):
    from regionmed_fast.train.stages import RunConfig, Stage

    stage = Stage(name="hierarchical", steps=steps, warmup=0,
                  losses={"global": 1.0, "region": 1.0, "fused": 1.0}, hard_negative_beta=0.5)
    return RunConfig(stages=[stage], model=model, model_args=model_args, image_size=size,
                     batch_size=batch, num_workers=workers, loader=loader,
                     precision="auto" if device.startswith("cuda") else "fp32",
                     log_every=1, save_every=10 ** 9)


class _StepClock:
    """``on_step`` callback: the time of every step's end (the trainer logs each step, and
    reading the loss for the log waits for the device)."""

    def __init__(self):
        self.t: list[float] = []

    def __call__(self, trainer, rec) -> None:
        self.t.append(time.perf_counter())


def _timed_fit(trainer_cls, cfg, data: str, device: str, warmup: int) -> dict:
    """Fit, and time the steps after the first ``warmup`` ones."""
    from regionmed_fast.train.trainer import build_model

    torch.manual_seed(0)
    model, tok = build_model(cfg)
    clock = _StepClock()
    out = tempfile.mkdtemp(prefix="bench_train_e2e_")
    tr = trainer_cls(cfg, data, out, device=device, model=model, tokenizer=tok, progress=False,
                     verbose=False, tensorboard=False, on_step=clock)
    try:
        tr.fit()
    finally:
        tr.close()
        shutil.rmtree(out, ignore_errors=True)
    gaps = [b - a for a, b in zip(clock.t[warmup:], clock.t[warmup + 1:])]
    span = clock.t[-1] - clock.t[warmup]
    return {"step_ms": [1e3 * g for g in gaps], "samples_per_s": cfg.batch_size * len(gaps) / span,
            "loader": getattr(tr, "loader_backend", None)}


def _in_memory_trainer(device: str):
    """A Trainer whose stage loader replays the real loader's batches from device memory."""
    from regionmed_fast.train.trainer import Trainer

    class Replay:
        def __init__(self, loader, stop: int):
            self.loader, self.batches_per_epoch = loader, loader.batches_per_epoch
            self.manifest_skipped, self.bad_counts = 0, {}
            self.batches = []
            for j, b in loader.iterate(0, stop):
                self.batches.append((j, {k: v.to(device) if torch.is_tensor(v) else v
                                         for k, v in b.items()}))
            if device.startswith("cuda"):
                torch.cuda.synchronize()

        def iterate(self, start: int, stop: int):
            return iter(self.batches[start:stop])

        def close(self) -> None:
            self.loader.close()

    class InMemoryTrainer(Trainer):
        def _stage_loader(self, si, size):
            stop = self.cfg.stages[si].steps * self.cfg.grad_accum
            return Replay(super()._stage_loader(si, size), stop)

    return InMemoryTrainer


def e2e(args, device: str) -> list[runner.Result]:
    from regionmed_fast.train.trainer import Trainer

    cuda = device.startswith("cuda")
    model, margs = ("regionmed-base", {}) if args.e2e_model == "base" else ("regionmed-tiny", TINY_ARGS)
    size = args.e2e_size or (224 if args.e2e_model == "base" else 64)
    batch = args.e2e_batch or (64 if cuda else 32)
    steps = args.e2e_steps or (12 if cuda else 16)
    warmup = 2
    workers = ([int(w) for w in args.e2e_workers.split(",")] if args.e2e_workers else
               [min(8, os.cpu_count() or 1)] if cuda else [0, 1, 2])
    n = 3 * batch * steps  # ~70 % of it is the train split: more than the steps read
    data = prefix_set(jpeg_synth(max(2000, n), 256), n)
    print(f"bench_train e2e: Trainer.fit, {model} {margs} at {size} px, batch {batch}, {steps} steps "
          f"({warmup} untimed) on {device}, loader {args.e2e_loader}, workers {workers}", flush=True)
    results, meta = [], {"model": model, "image_size": size, "batch": batch, "steps": steps,
                         "untimed_steps": warmup, "data": "synthetic 256 px JPEGs"}

    def add(name: str, r: dict, extra: dict) -> None:
        ms = r["step_ms"]
        res = runner.Result(name, E2E_GROUP, device, statistics.median(ms), min(ms), max(ms),
                            len(ms), float("nan"), {**meta, **extra, "samples_per_s": r["samples_per_s"]},
                            spread=runner.spread(statistics.median(ms), min(ms), max(ms)))
        results.append(res)
        print(f"  {name:<34} {r['samples_per_s']:8.1f} samples/s (median step {res.median_ms:.1f} ms)",
              flush=True)

    base = run_config(model, margs, size, batch, steps, workers[0], args.e2e_loader, device)
    add("compute-only", _timed_fit(_in_memory_trainer(device), base, data, device, warmup),
        {"loader": "batches in device memory"})
    for w in workers:
        cfg = dataclasses.replace(base, num_workers=w)
        r = _timed_fit(Trainer, cfg, data, device, warmup)
        add(f"loader ({r['loader'] or args.e2e_loader}, {w} workers)", r,
            {"loader": r["loader"] or args.e2e_loader, "workers": w})
    comp = results[0].meta["samples_per_s"]
    for r in results[1:]:
        r.ratios["loader-inclusive / compute-only samples/s"] = r.meta["samples_per_s"] / comp
    best = max(results[1:], key=lambda r: r.meta["samples_per_s"])
    best.meta["fastest"] = True
    print(f"  loader-inclusive / compute-only: " + ", ".join(
        f"{r.meta['workers']} workers {r.ratios['loader-inclusive / compute-only samples/s']:.2f}"
        for r in results[1:]) + f"; fastest: {best.meta['workers']} workers", flush=True)
    return results


# ---------------------------------------------------------------- memory
_CHILD = """
import json, os, resource, sys, torch
from regionmed_fast.train.stages import RunConfig, Stage
from regionmed_fast.train.trainer import Trainer
data, out, steps, batch, workers, cache = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7])
torch.set_num_threads(1)
stage = Stage(name="region", steps=steps, warmup=0, losses={"global": 1.0, "region": 1.0})
cfg = RunConfig(stages=[stage], model="regionmed-tiny", model_args=%r, image_size=64,
                batch_size=batch, num_workers=workers, cache_mb=cache, loader="cpu",
                precision="fp32", log_every=50, save_every=10 ** 9)
tr = Trainer(cfg, data, out, progress=False, verbose=False, tensorboard=False, device="cpu")
tr.fit()
tr.close()
hwm = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print("MEMORY " + json.dumps({"vmhwm_mb": hwm / 1024, "children_maxrss_mb": kids / 1024}))
""" % (TINY_ARGS,)


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (from /proc)."""
    parent: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as fh:
                    parent[int(d)] = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += [c for c, pp in parent.items() if pp == p]
    return out


def _pss_mb(pids: list[int]) -> float:
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/smaps_rollup") as fh:
                for line in fh:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total / 1024


def _peak_of_run(cmd: list[str], env: dict) -> tuple[dict, float, float]:
    """Run ``cmd``; returns (its MEMORY line, peak tree PSS MiB, wall s)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0.0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _pss_mb(_tree(proc.pid)))
            done.wait(0.2)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = proc.communicate()
    done.set()
    th.join()
    if proc.returncode != 0:
        raise RuntimeError(f"memory run failed ({proc.returncode}): {err[-2000:]}")
    line = [ln for ln in out.splitlines() if ln.startswith("MEMORY ")][-1]
    return json.loads(line[7:]), peak[0], time.perf_counter() - t0


def memory(args) -> list[runner.Result]:
    sizes = [int(s) for s in args.memory_sets.split(",")]
    steps, batch, workers = args.memory_steps, args.memory_batch, args.memory_workers
    full = jpeg_synth(max(sizes), 256)
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.path.dirname(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    print(f"bench_train memory: {steps} steps, regionmed-tiny 64 px, batch {batch}, {workers} "
          f"workers, sets {sizes}", flush=True)
    results = []
    for n in sizes:
        data = full if n == max(sizes) else prefix_set(full, n)
        with tempfile.TemporaryDirectory(prefix="bench_train_mem_") as out:
            cmd = [sys.executable, "-c", _CHILD, data, out, str(steps), str(batch), str(workers),
                   str(args.memory_cache_mb)]
            got, pss, wall = _peak_of_run(cmd, env)
        meta = {"images": n, "steps": steps, "batch": batch, "workers": workers,
                "cache_mb": args.memory_cache_mb, **got, "tree_pss_peak_mb": pss, "wall_s": wall}
        r = runner.Result(f"{n} images", MEM_GROUP, "cpu", wall * 1e3 / steps, float("nan"),
                          float("nan"), steps, pss, meta)
        results.append(r)
        print(f"  {n:>6} images: tree PSS peak {pss:.0f} MiB, main VmHWM {got['vmhwm_mb']:.0f} MiB, "
              f"largest worker {got['children_maxrss_mb']:.0f} MiB ({wall:.0f} s)", flush=True)
    base = results[0]
    for r in results[1:]:
        for key in ("tree_pss_peak_mb", "vmhwm_mb"):
            r.ratios[f"{key} vs {base.name}"] = r.meta[key] / base.meta[key]
    if len(results) > 1:
        worst = max(abs(v - 1) for r in results[1:] for v in r.ratios.values())
        print(f"  largest difference from the {base.name} set: {100 * worst:.1f} % (goal <= 20 %)",
              flush=True)
    return results
