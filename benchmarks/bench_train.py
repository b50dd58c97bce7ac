"""Benchmark of a whole progressive-training step (docs/design.md section 8).

One step of the hierarchical stage (global + region + fused losses, HN-NCE beta 0.5): forward of
both towers and the ROI processor, the three chunked CLIP losses, backward, AdamW (foreach on
the CPU, fused on CUDA). Cases in the same run, on the same batches held in memory:

* ``fused``       every op on ``backend="auto"`` (C++ kernels on the CPU, Triton/CUDA on a GPU)
* ``reference``   every op on its plain PyTorch ``reference`` backend
* ``fused+compile`` / ``reference+compile``  the model under ``torch.compile``
* ``encoders``    the limit: forward + backward of the image and text towers alone on the same
  images and texts (no ROI processor, no loss; the sum of the outputs is backpropagated)

Reported: ms per step, samples/s, peak memory, speedup vs ``reference`` and the overhead of the
region machinery over ``encoders`` (``fused`` time / ``encoders`` time - 1). Then the loss curve
check: N optimizer steps from the same initial weights and batches with ``fused`` and with
``reference`` must give the same losses within tolerance.

Sizes: ``cpu`` - the demo's ``regionmed-tiny`` (64 px, 8 px patches, tiny text tower, batch 32);
``cuda`` - ``regionmed-base`` (ViT-B/16 at 224 px, MiniLM text tower, batch 128, bf16 autocast).

The trainer end to end (``--cases e2e``, see ``train_pipeline.py``): ``Trainer.fit`` on real
JPEGs through the real loader against the same steps from batches held in device memory, per
worker count; and its peak memory on a 2,000- and a 20,000-image set (``--cases memory``).

Against OpenCLIP (on CUDA by default, ``--openclip on`` elsewhere): OpenCLIP's own ViT-B-16
train step beside our global-only and region-aware steps at batch 256, 224 px, bf16, eager and
compiled (``--compile-mode``; see ``OpenClipComparison``). On the CPU the same code runs with
tiny towers (batch 4, 64 px). ``--only-openclip`` runs only this comparison.

    python benchmarks/bench_train.py [--quick] [--device cpu|cuda] [--repeats N] [--batch B]
        [--cases step,e2e,memory] [--openclip auto|on|off] [--compile-mode blocks|whole|none]
        [--only-openclip] [--e2e-model tiny|base] [--e2e-steps N] [--e2e-batch B]
        [--e2e-workers 0,1,2] [--memory-sets 2000,20000] [--memory-steps 200] ...
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import runner  # noqa: E402
import train_pipeline  # noqa: E402

from regionmed_fast.train.losses import compute_losses  # noqa: E402
from regionmed_fast.train.stages import Stage  # noqa: E402

TINY = {"model": "regionmed-tiny", "size": 64,
        "args": {"image_size": 64, "text": "tiny", "vision": {"patch_size": 8}}}
BASE = {"model": "regionmed-base", "size": 224, "args": {}}
STAGE = Stage(name="hierarchical", steps=1, losses={"global": 1.0, "region": 1.0, "fused": 1.0},
              hard_negative_beta=0.5)
INPUT_KEYS = ("images", "boxes", "box_counts", "text_ids", "text_mask", "region_text_ids",
              "region_text_mask")


def build(spec: dict, backend: str, device: str, seed: int = 0):
    from regionmed_fast.model import create_model_and_transforms, get_tokenizer

    args = copy.deepcopy(spec["args"])
    args.setdefault("roi", {})["backend"] = backend
    torch.manual_seed(seed)
    model = create_model_and_transforms(spec["model"], **args)[0].to(device)
    for m in model.modules():  # the loss-curve check compares backends, not dropout draws
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    text = model.config.text
    return model, get_tokenizer(text.name, text.context_length)


def make_batches(root: str, size: int, batch: int, count: int, tokenizer) -> list[dict]:
    """``count`` batches of the dataset folder ``root`` (the data layer's eval path: whole images)."""
    from regionmed_fast.data.batch import build_batch
    from regionmed_fast.data.manifest import read_manifest

    recs = read_manifest(root)
    return [build_batch([recs[(i * batch + j) % len(recs)] for j in range(batch)], image_size=size,
                        tokenizer=tokenizer) for i in range(count)]


def to_dev(batch: dict, device: str) -> dict:
    return {k: batch[k].to(device) for k in INPUT_KEYS}


class Step:
    """One optimizer step of the hierarchical stage on a fixed model/optimizer."""

    def __init__(self, model, backend: str, device: str, amp: torch.dtype | None, compile_: bool):
        self.model, self.backend, self.device, self.amp = model, backend, device, amp
        self.net = torch.compile(model) if compile_ else model
        kw = {"fused": True} if device.startswith("cuda") else {"foreach": True}
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **kw)

    def __call__(self, batch: dict, inputs: dict | None = None) -> float:
        inputs = inputs if inputs is not None else to_dev(batch, self.device)
        with torch.autocast(self.device.split(":")[0], dtype=self.amp or torch.float32,
                            enabled=self.amp is not None):
            out = self.net(inputs)
        loss, _ = compute_losses(out, batch, STAGE, backend=self.backend)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())


def encoders_step(model, device: str, amp):
    """Forward + backward of the two towers alone, called as the model's forward calls them (the
    image texts and the region texts in two text-tower calls): the limit the full step is
    measured against."""
    def run(batch: dict, inputs: dict) -> float:
        with torch.autocast(device.split(":")[0], dtype=amp or torch.float32, enabled=amp is not None):
            pooled, grid = model.visual(inputs["images"])
            t = model.text(inputs["text_ids"], inputs["text_mask"])
            rt = model.text(inputs["region_text_ids"], inputs["region_text_mask"])
            total = pooled.float().sum() + grid.float().sum() + t.float().sum() + rt.float().sum()
        total.backward()
        model.zero_grad(set_to_none=True)
        return float(total.detach())
    return run


def loss_curve(spec, device, amp, batches, steps: int) -> dict:
    curves = {}
    for backend in ("auto", "reference"):
        model, _ = build(spec, backend, device)
        step = Step(model, backend, device, amp, compile_=False)
        curves[backend] = [step(batches[i % len(batches)]) for i in range(steps)]
    diff = max(abs(a - b) for a, b in zip(curves["auto"], curves["reference"]))
    rel = max(abs(a - b) / max(abs(b), 1e-6) for a, b in zip(curves["auto"], curves["reference"]))
    return {"steps": steps, "max_abs_diff": diff, "max_rel_diff": rel, "curves": curves,
            "first": curves["auto"][0], "last": curves["auto"][-1]}


# ---------------------------------------------------------------- the step against OpenCLIP's
# OpenCLIP's own ViT-B-16 train step (its model, its ClipLoss, fused AdamW, bf16 autocast) beside
# ours at the same batch, image size and precision, on the same fixed-shape batches held on the
# device: our global-only step (regionmed-base without its ROI processor, the global loss) and
# our region-aware step (the hierarchical stage: global + region + fused losses, 4 boxes per
# image). Each eager, then compiled the same way for all three (see compile_model).
OPENCLIP_GPU = {"openclip": "ViT-B-16", "ours": BASE, "size": 224, "batch": 256, "label": "ViT-B/16 224 px"}
# the CPU smoke size: the same code paths with towers small enough for a test
OPENCLIP_TINY = {"openclip": {"embed_dim": 64,
                              "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32,
                                             "patch_size": 8},
                              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64,
                                           "heads": 2, "layers": 2}},
                 "ours": TINY, "size": 64, "batch": 4, "label": "tiny ViT 64 px"}
GLOBAL_STAGE = Stage(name="global", steps=1, losses={"global": 1.0})
BOXES_PER_IMAGE = 4
_FINDINGS = ("nodule", "opacity", "effusion", "consolidation", "mass", "calcified granuloma",
             "pneumothorax", "atelectasis")
_PLACES = ("left upper zone", "left lower zone", "right upper zone", "right middle zone",
           "right lower zone", "retrocardiac region", "left costophrenic angle", "right hilum")


def clip_batches(count: int, batch: int, size: int, tokenizer, openclip_tokenizer, device: str,
                 seed: int = 0) -> list[dict]:
    """``count`` batches of one shape: random images (normalised scale), captions and
    ``BOXES_PER_IMAGE`` region boxes + texts per image, tokenised for both models (ours padded
    to the longest text over all batches, so every batch has the same shape)."""
    g = torch.Generator().manual_seed(seed)
    pick = lambda seq: seq[int(torch.randint(len(seq), (1,), generator=g))]  # noqa: E731
    raw = []
    for _ in range(count):
        regions = [[f"{pick(('small', 'large', '4 mm', 'ill-defined'))} {pick(_FINDINGS)} in the "
                    f"{pick(_PLACES)}" for _ in range(BOXES_PER_IMAGE)] for _ in range(batch)]
        texts = [f"chest radiograph: {r[0]}; {r[1]}" for r in regions]
        wh = torch.empty(batch, BOXES_PER_IMAGE, 2).uniform_(size / 8, size / 2, generator=g)
        xy = torch.rand(batch, BOXES_PER_IMAGE, 2, generator=g) * (size - wh)
        raw.append((texts, regions, torch.cat([xy, xy + wh], 2)))
    ids, mask = tokenizer([t for texts, _, _ in raw for t in texts])
    rids, rmask = tokenizer([t for _, regions, _ in raw for r in regions for t in r])
    k = batch * BOXES_PER_IMAGE
    out = []
    for i, (texts, regions, boxes) in enumerate(raw):
        out.append({
            "images": torch.randn(batch, 3, size, size, generator=g).to(device),
            "boxes": boxes.to(device),
            "box_counts": torch.full((batch,), BOXES_PER_IMAGE, dtype=torch.long, device=device),
            "text_ids": ids[i * batch:(i + 1) * batch].to(device),
            "text_mask": mask[i * batch:(i + 1) * batch].to(device),
            "region_text_ids": rids[i * k:(i + 1) * k].to(device),
            "region_text_mask": rmask[i * k:(i + 1) * k].to(device),
            "openclip_text": openclip_tokenizer(texts).to(device),
            "texts": texts, "region_texts": regions})
    return out


def compile_model(model: torch.nn.Module, mode: str):
    """The callable to train with: ``none`` (eager), ``whole`` (``torch.compile(model)``, as
    OpenCLIP's ``--torchcompile`` and our trainer's ``--compile`` do) or ``blocks`` (each block
    of every ModuleList of identical blocks compiled in place, the transformer layers of both
    towers: one compiled graph serves all layers, so a cold compile takes seconds, not minutes;
    embeddings, heads, ROI processor and losses stay eager)."""
    if mode == "none":
        return model
    if mode == "whole":
        return torch.compile(model)
    if mode != "blocks":
        raise ValueError(f"compile mode must be none, whole or blocks, got {mode!r}")
    for mod in model.modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) > 1 and len({type(m) for m in mod}) == 1:
            for blk in mod:
                blk.compile()
    return model


def _adamw(model: torch.nn.Module, device: str) -> torch.optim.Optimizer:
    # OpenCLIP's defaults for ViT-B training (lr, betas, eps, weight decay), for all three steps
    kw = {"fused": True} if device.startswith("cuda") else {"foreach": True}
    return torch.optim.AdamW(model.parameters(), lr=5e-4, betas=(0.9, 0.98), eps=1e-6,
                             weight_decay=0.2, **kw)


class OpenClipStep:
    """One step as OpenCLIP's training loop takes it: forward and ClipLoss under autocast,
    backward, optimizer step, logit scale clamped to log(100)."""

    def __init__(self, model, device: str, amp: torch.dtype | None) -> None:
        import open_clip

        self.model, self.net, self.device, self.amp = model, model, device, amp
        self.loss = open_clip.ClipLoss()
        self.opt = _adamw(model, device)

    def __call__(self, b: dict) -> torch.Tensor:
        with torch.autocast(self.device.split(":")[0], dtype=self.amp or torch.float32,
                            enabled=self.amp is not None):
            out = self.net(b["images"], b["openclip_text"])
            if isinstance(out, dict):
                out = (out["image_features"], out["text_features"], out["logit_scale"])
            loss = self.loss(*out[:3])
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(100))
        return loss.detach()


class OursStep:
    """Our step on the same batch: ``stage`` picks the losses (global-only or hierarchical)."""

    def __init__(self, model, device: str, amp: torch.dtype | None, stage: Stage) -> None:
        self.model, self.net, self.device, self.amp, self.stage = model, model, device, amp, stage
        self.keys = INPUT_KEYS if model.roi is not None else ("images", "text_ids", "text_mask")
        self.opt = _adamw(model, device)

    def __call__(self, b: dict) -> torch.Tensor:
        with torch.autocast(self.device.split(":")[0], dtype=self.amp or torch.float32,
                            enabled=self.amp is not None):
            out = self.net({k: b[k] for k in self.keys})
        loss, _ = compute_losses(out, b, self.stage)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()


def openclip_steps(spec: dict, device: str, amp: torch.dtype | None) -> dict:
    """The three steps, eager, keyed by case name (models built from the same seed)."""
    import open_clip

    from regionmed_fast.model import create_model_and_transforms

    torch.manual_seed(0)
    oc = spec["openclip"]
    clip = (open_clip.create_model(oc) if isinstance(oc, str) else open_clip.CLIP(**oc)).to(device)
    steps = {"OpenCLIP " + (oc if isinstance(oc, str) else "tiny CLIP"): OpenClipStep(clip, device, amp)}
    ours = spec["ours"]
    for name, stage, use_roi in (("ours global-only", GLOBAL_STAGE, False),
                                 ("ours region-aware", STAGE, True)):
        torch.manual_seed(0)
        model = create_model_and_transforms(ours["model"], use_roi=use_roi, **copy.deepcopy(ours["args"]))[0]
        steps[name] = OursStep(model.to(device), device, amp, stage)
    return steps


def get_tokenizer_for(model):
    """Our model's tokenizer (its text tower's)."""
    from regionmed_fast.model import get_tokenizer

    return get_tokenizer(model.config.text.name, model.config.text.context_length)


def _dynamo_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class OpenClipComparison:
    """The three steps on their batches; :meth:`run` times them eager or compiled.

    Results come in groups ``... eager`` / ``... compiled (<mode>)`` (baseline: OpenCLIP), each
    with ``samples_per_s`` and, for the region-aware step, ``vs ours global-only`` (its
    samples/s over the global-only step's); compiled cases carry ``compile_s`` and
    ``graphs_compiled`` (one per kind of block is expected: more means per-layer recompiles).
    """

    def __init__(self, device: str, amp: torch.dtype | None, *, spec: dict | None = None,
                 batch: int | None = None) -> None:
        import open_clip

        self.device, self.cuda = device, device.startswith("cuda")
        self.spec = spec or (OPENCLIP_GPU if self.cuda else OPENCLIP_TINY)
        self.batch = batch or self.spec["batch"]
        self.steps = openclip_steps(self.spec, device, amp)
        self.baseline = next(iter(self.steps))
        oc = self.spec["openclip"]
        oc_tok = open_clip.get_tokenizer(oc) if isinstance(oc, str) else open_clip.tokenize
        self.batches = clip_batches(2, self.batch, self.spec["size"],
                                    get_tokenizer_for(self.steps["ours global-only"].model), oc_tok, device)
        dname = "fp32" if amp is None else str(amp).replace("torch.", "").replace("bfloat16", "bf16")
        self.label = (f"train step vs OpenCLIP, {self.spec['label']}, batch {self.batch}, "
                      f"{BOXES_PER_IMAGE} boxes/image, {dname}")

    def _case(self, name: str, step, group: str, mode: str) -> runner.Case:
        meta = {"batch": self.batch, "compile": mode, "image_size": self.spec["size"]}
        failed = None
        if mode != "none":
            t0, g0 = time.perf_counter(), _dynamo_graphs()
            try:
                step.net = compile_model(step.model, mode)
                step(self.batches[0])  # the cold compile, kept out of the timing
                if self.cuda:
                    torch.cuda.synchronize()
            except Exception as exc:  # reported in this case's row; the others still run
                failed = exc
            meta["compile_s"], meta["graphs_compiled"] = round(time.perf_counter() - t0, 1), _dynamo_graphs() - g0
        state = {"i": 0}

        def run():
            if failed is not None:
                raise failed
            state["i"] = (state["i"] + 1) % len(self.batches)
            return step(self.batches[state["i"]])
        return runner.Case(name, run, group=group, device=self.device, meta=meta)

    def run(self, mode: str = "none", repeats: int = 5, max_seconds: float = 20.0) -> list:
        """Time the three steps, eager (``none``) or compiled with ``mode`` (see compile_model)."""
        group = f"{self.label}, {'eager' if mode == 'none' else 'compiled (' + mode + ')'}"
        cases = [self._case(name, step, group, mode) for name, step in self.steps.items()]
        graphs0 = _dynamo_graphs()
        res = runner.run_cases(cases, warmup=2 * len(self.batches), repeats=repeats,
                               max_seconds=max_seconds, baselines={group: self.baseline})
        recompiled = _dynamo_graphs() - graphs0
        for r in res:
            if not r.error:
                r.meta["samples_per_s"] = self.batch / (r.median_ms / 1e3)
                r.meta["graphs_compiled_while_timing"] = recompiled
        by = {r.name: r for r in res}
        g, ra = by.get("ours global-only"), by.get("ours region-aware")
        if g and ra and not g.error and not ra.error:
            ra.ratios["vs ours global-only"] = g.median_ms / ra.median_ms
        for r in res:
            if not r.error:
                extras = ", ".join(f"{k} {v:.2f}x" for k, v in r.ratios.items() if not k.startswith("memory"))
                print(f"  {r.group.rsplit(', ', 1)[-1]:<18} {r.name:<22} {r.meta['samples_per_s']:8.1f} "
                      f"samples/s  {extras}", flush=True)
        return res


def openclip_setup(args, amp: torch.dtype | None, extra: dict) -> tuple[OpenClipComparison, str]:
    """The comparison ``main`` runs (``--batch`` applies with ``--only-openclip``) and its compile
    mode; records both in ``extra``."""
    cuda = args.device.startswith("cuda")
    mode = args.compile_mode or ("blocks" if cuda else "none")
    print(f"bench_train: OpenCLIP comparison on {args.device}, compile mode {mode}", flush=True)
    cmp = OpenClipComparison(args.device, amp, batch=args.batch if args.only_openclip else None)
    extra["openclip_comparison"] = {"compile_mode": mode, "boxes_per_image": BOXES_PER_IMAGE,
                                    "batch": cmp.batch,
                                    "spec": {k: v for k, v in cmp.spec.items() if k != "ours"}}
    return cmp, mode


def step_cases(args, device: str, amp) -> tuple[list, dict, bool, str]:
    """The backend comparison of one hierarchical step on batches in memory: results, extra
    JSON, whether the loss curves agree, and the Markdown note on them."""
    cuda = device.startswith("cuda")
    spec = BASE if cuda else TINY
    batch = args.batch or (128 if cuda else 32) // (2 if args.quick else 1)
    curve_steps = args.curve_steps or (10 if args.quick else 50)
    tmp = tempfile.mkdtemp(prefix="bench_train_")
    from regionmed_fast.data.synthetic import write_dataset

    write_dataset(tmp, n=max(4 * batch, 64), size=spec["size"], seed=0, qa=False)
    print(f"bench_train: {spec['model']} {spec['args']} batch {batch} on {device}"
          f"{' bf16 autocast' if amp else ''}", flush=True)

    models = {b: build(spec, b, device) for b in ("auto", "reference")}
    tok = models["auto"][1]
    batches = make_batches(tmp, spec["size"], batch, 4, tok)
    inputs = [to_dev(b, device) for b in batches]
    n_regions = sum(int(b["box_counts"].sum()) for b in batches) / len(batches)

    def cycle(fn):
        own = {"i": 0}  # every case is timed on the same sequence of batches

        def run():
            i = own["i"] = (own["i"] + 1) % len(batches)
            return fn(batches[i], inputs[i])
        return run

    cases = []
    steps = {}
    variants = [("fused", "auto", False), ("reference", "reference", False)]
    # --quick skips torch.compile: a cold compile of the whole model costs minutes on 2 CPU cores
    # and about a minute on a GPU, more than the quick suite's budget per benchmark
    if not args.no_compile and not args.quick:
        variants += [("fused+compile", "auto", True), ("reference+compile", "reference", True)]
    for name, backend, comp in variants:
        steps[name] = Step(models[backend][0] if not comp else build(spec, backend, device)[0],
                           backend, device, amp, comp)
        cases.append(runner.Case(name, cycle(steps[name]), group="train_step", device=device,
                                 meta={"batch": batch, "backend": backend, "compile": comp}))
    enc_model = build(spec, "auto", device)[0]
    cases.append(runner.Case("encoders", cycle(encoders_step(enc_model, device, amp)), group="train_step",
                             device=device, meta={"batch": batch, "limit": True}))
    # warm every case before timing any: the first case measured otherwise pays for the
    # allocator's growth and thread-pool start-up that the later ones inherit
    for c in cases:
        try:
            c.fn()
        except Exception:
            pass  # run_cases reports the error
    # the batches differ in shape (box and text counts): the warm-up sees each one, so that no
    # first-time cost of a shape (allocator growth, autotuning, recompiles) is timed
    results = runner.run_cases(cases, warmup=2 * len(batches), repeats=min(args.repeats, 3) if args.quick else args.repeats,
                               max_seconds=60 if not args.quick else 20,
                               baselines={"train_step": "reference"})
    by = {r.name: r for r in results}
    enc = by.get("encoders")
    summary = {}
    for r in results:
        if r.error:
            continue
        r.meta["samples_per_s"] = batch / (r.median_ms / 1e3)
        if enc is not None and not enc.error and r.name != "encoders":
            r.ratios["overhead vs encoders"] = r.median_ms / enc.median_ms - 1.0
        summary[r.name] = {"samples_per_s": r.meta["samples_per_s"], "median_ms": r.median_ms,
                           "peak_mem_mb": r.peak_mem_mb}
    print("\n  samples/s: " + ", ".join(f"{k} {v['samples_per_s']:.1f}" for k, v in summary.items()))
    if "fused" in summary and "reference" in summary:
        print(f"  fused / reference samples/s: {summary['fused']['samples_per_s'] / summary['reference']['samples_per_s']:.2f}x (goal >= 1.3x on CPU)")
    if "fused" in summary and "encoders" in summary:
        print(f"  region machinery overhead over the encoders alone: "
              f"{100 * (summary['fused']['median_ms'] / summary['encoders']['median_ms'] - 1):.1f}% (goal <= 15%)")
    t0 = time.time()
    curve = loss_curve(spec, device, amp, batches, curve_steps)
    print(f"  loss curve over {curve_steps} steps, fused vs reference: max |diff| "
          f"{curve['max_abs_diff']:.2e} (relative {curve['max_rel_diff']:.2e}); loss "
          f"{curve['first']:.3f} -> {curve['last']:.3f} ({time.time() - t0:.0f} s)")
    curve["ok"] = curve["max_rel_diff"] < (2e-2 if amp else 1e-3)
    extra = {"model": spec["model"], "model_args": spec["args"], "batch": batch,
             "regions_per_batch": n_regions, "amp": str(amp), "summary": summary, "loss_curve": curve}
    note = (f"\nbatch {batch}, {n_regions:.0f} regions per batch; samples/s: "
            + ", ".join(f"{k} {v['samples_per_s']:.1f}" for k, v in summary.items())
            + f"\n\nloss curve over {curve_steps} steps, fused vs reference: max relative "
            f"difference {curve['max_rel_diff']:.2e} ({'ok' if curve['ok'] else 'NOT within tolerance'})\n")
    return results, extra, curve["ok"], note


class Saver:
    """Writes ``<machine>-train.json/.md`` through the runner after each part. A group this run
    does not measure keeps its figures from the file already there (so ``--cases memory`` alone
    adds to the step and end-to-end figures instead of erasing them); ``kept_groups`` in the
    JSON names those."""

    def __init__(self, out_dir: str | None):
        self.out_dir = out_dir
        self.old: list = []
        self.old_extra: dict = {}
        path = os.path.join(out_dir or os.environ.get("REGIONMED_BENCH_OUT") or runner.RESULTS_DIR,
                            f"{runner.machine_tag()}-train.json")
        if os.path.isfile(path):
            try:
                with open(path) as fh:
                    payload = json.load(fh)
                fields = {f.name for f in dataclasses.fields(runner.Result)}
                self.old = [runner.Result(**{k: v for k, v in r.items() if k in fields})
                            for r in payload.get("results", [])]
                self.old_extra = {k: v for k, v in payload.items()
                                  if k not in ("bench", "time", "machine", "results")}
            except (OSError, ValueError, TypeError):
                self.old = []
        self.notes: list[str] = []

    def save(self, results: list, extra: dict) -> tuple[str, str]:
        groups = {r.group for r in results}
        kept = [r for r in self.old if r.group not in groups]
        extra = {**self.old_extra, **extra, "kept_groups": sorted({r.group for r in kept})}
        js, md = runner.save("train", results + kept, extra=extra, out_dir=self.out_dir)
        if self.notes:
            with open(md, "a") as fh:
                fh.write("".join(self.notes))
        return js, md


def main(argv: list[str] | None = None) -> int:
    p = runner.common_args(__doc__.split("\n")[0])
    p.add_argument("--cases", default="step,e2e",
                   help="comma-separated parts: step (backend comparison of one step), e2e "
                        "(Trainer.fit with the loader vs batches in memory), memory (peak memory "
                        "of 200 steps on a 2,000- and a 20,000-image set; minutes, ~2 GB of JPEGs "
                        "written once under $REGIONMED_BENCH_DATA)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--curve-steps", type=int, default=None)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--openclip", choices=("auto", "on", "off"), default="auto",
                   help="also time OpenCLIP's ViT-B-16 step beside ours (auto: on CUDA only; "
                        "on the CPU: tiny towers)")
    p.add_argument("--compile-mode", choices=("blocks", "whole", "none"), default=None,
                   help="how the OpenCLIP comparison compiles all three models (see compile_model; "
                        "default: blocks on CUDA, none on the CPU)")
    p.add_argument("--only-openclip", action="store_true", help="skip the backend comparison")
    e = p.add_argument_group("end to end (--cases e2e)")
    e.add_argument("--e2e-model", choices=("tiny", "base"), default=None,
                   help="tiny (64 px, CPU default) or base (ViT-B/16 at 224 px, the progressive "
                        "config's size; GPU default)")
    e.add_argument("--e2e-size", type=int, default=None, help="image size (default 64 / 224)")
    e.add_argument("--e2e-batch", type=int, default=None, help="global batch (default 32 CPU, 64 GPU)")
    e.add_argument("--e2e-steps", type=int, default=None,
                   help="optimizer steps per run, 2 of them untimed (default 16 CPU, 12 GPU)")
    e.add_argument("--e2e-workers", default=None,
                   help="worker counts to run the loader with (default 0,1,2 CPU; min(8, cores) GPU)")
    e.add_argument("--e2e-loader", choices=("auto", "cpu", "dali"), default="auto")
    m = p.add_argument_group("memory (--cases memory)")
    m.add_argument("--memory-sets", default="2000,20000", help="dataset sizes (images)")
    m.add_argument("--memory-steps", type=int, default=200)
    m.add_argument("--memory-batch", type=int, default=16)
    m.add_argument("--memory-workers", type=int, default=2)
    m.add_argument("--memory-cache-mb", type=int, default=0)
    args = p.parse_args(argv)
    device = args.device
    cuda = device.startswith("cuda")
    args.e2e_model = args.e2e_model or ("base" if cuda else "tiny")
    parts = {c.strip() for c in args.cases.split(",") if c.strip()}
    unknown = parts - {"step", "e2e", "memory"}
    if unknown:
        p.error(f"--cases: unknown part(s) {sorted(unknown)}; choose from step, e2e, memory")
    amp = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else None
    saver = Saver(args.out)
    results, extra, ok = [], {}, True
    # the comparison with OpenCLIP: eager first, compiled last (the cold compiles are the part
    # most likely to overrun a time limit); results are saved after each part
    oc, oc_mode = None, "none"
    if args.only_openclip or args.openclip == "on" or (args.openclip == "auto" and cuda):
        oc, oc_mode = openclip_setup(args, amp, extra)
        results += oc.run("none", repeats=args.repeats)
        saver.save(results, extra)
    if args.only_openclip:
        if oc_mode != "none":
            results += oc.run(oc_mode, repeats=args.repeats)
        js, _ = saver.save(results, extra)
        print(f"wrote {js}")
        return 0
    if "step" in parts:
        res, ext, ok, note = step_cases(args, device, amp)
        results += res
        extra.update(ext)
        saver.notes.append(note)
        saver.save(results, extra)
    if "e2e" in parts:
        results += train_pipeline.e2e(args, device)
        saver.save(results, extra)
    if "memory" in parts:
        if cuda:
            print("bench_train: the memory part runs on the CPU path; skipped with --device cuda")
        else:
            results += train_pipeline.memory(args)
            saver.save(results, extra)
    if oc is not None and oc_mode != "none":
        results += oc.run(oc_mode, repeats=args.repeats)
    js, md = saver.save(results, extra)
    print(f"wrote {js} and {md}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
