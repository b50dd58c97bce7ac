"""Benchmark of a whole progressive-training step (DESIGN.md section 9, issue 7).

One step of the hierarchical stage (global + region + fused losses, HN-NCE beta 0.5): forward of
both towers and the ROI processor, the three chunked CLIP losses, backward, AdamW (foreach on
the CPU, fused on CUDA). Cases in the same run, on the same batches held in memory:

* ``fused``       every op on ``backend="auto"`` (C++ kernels on the CPU, Triton/CUDA on a GPU)
* ``reference``   every op on its plain PyTorch ``reference`` backend
* ``fused+compile`` / ``reference+compile``  the model under ``torch.compile``
* ``fused+loader`` the step plus batch assembly from disk (decode + resize, no cache), i.e. the
  whole pipeline on one process
* ``encoders``    the limit: forward + backward of the image and text towers alone on the same
  images and texts (no ROI processor, no loss; the sum of the outputs is backpropagated)

Reported: ms per step, samples/s, peak memory, speedup vs ``reference`` and the overhead of the
region machinery over ``encoders`` (``fused`` time / ``encoders`` time - 1). Then the loss curve
check: N optimizer steps from the same initial weights and batches with ``fused`` and with
``reference`` must give the same losses within tolerance.

Sizes: ``cpu`` - the demo's ``regionmed-tiny`` (64 px, 8 px patches, tiny text tower, batch 32);
``cuda`` - ``regionmed-base`` (ViT-B/16 at 224 px, MiniLM text tower, batch 128, bf16 autocast).

    python benchmarks/bench_train.py [--quick] [--device cpu|cuda] [--repeats N] [--batch B]
"""
from __future__ import annotations

import copy
import os
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import runner  # noqa: E402

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


def make_batches(root: str, size: int, batch: int, count: int, tokenizer, cache: bool = True):
    from regionmed_fast.train.data import SampleReader, read_records

    reader = SampleReader(root, read_records(root), size, cache=cache)
    n = len(reader)
    return reader, [reader.batch([(i * batch + j) % n for j in range(batch)], tokenizer)
                    for i in range(count)]


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
    """Forward + backward of the two towers alone: the limit the full step is measured against."""
    def run(batch: dict, inputs: dict) -> float:
        with torch.autocast(device.split(":")[0], dtype=amp or torch.float32, enabled=amp is not None):
            pooled, grid = model.visual(inputs["images"])
            ids, mask = inputs["text_ids"], inputs["text_mask"]
            rids, rmask = inputs["region_text_ids"], inputs["region_text_mask"]
            L = max(ids.shape[1], rids.shape[1])
            pad = torch.nn.functional.pad
            t = model.text(torch.cat([pad(ids, (0, L - ids.shape[1])), pad(rids, (0, L - rids.shape[1]))]),
                           torch.cat([pad(mask, (0, L - mask.shape[1])), pad(rmask, (0, L - rmask.shape[1]))]))
            total = pooled.float().sum() + grid.float().sum() + t.float().sum()
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


def main(argv: list[str] | None = None) -> int:
    p = runner.common_args(__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--curve-steps", type=int, default=None)
    p.add_argument("--no-compile", action="store_true")
    args = p.parse_args(argv)
    device = args.device
    cuda = device.startswith("cuda")
    spec = BASE if cuda else TINY
    amp = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else None
    batch = args.batch or (128 if cuda else 32) // (2 if args.quick else 1)
    curve_steps = args.curve_steps or (10 if args.quick else 50)
    tmp = tempfile.mkdtemp(prefix="bench_train_")
    from regionmed_fast.data.synthetic import write_dataset

    write_dataset(tmp, n=max(4 * batch, 64), size=spec["size"], seed=0, qa=False)
    print(f"bench_train: {spec['model']} {spec['args']} batch {batch} on {device}"
          f"{' bf16 autocast' if amp else ''}", flush=True)

    models = {b: build(spec, b, device) for b in ("auto", "reference")}
    tok = models["auto"][1]
    reader, batches = make_batches(tmp, spec["size"], batch, 4, tok)
    inputs = [to_dev(b, device) for b in batches]
    n_regions = sum(int(b["box_counts"].sum()) for b in batches) / len(batches)
    state = {"i": 0}

    def cycle(fn):
        def run():
            i = state["i"] = (state["i"] + 1) % len(batches)
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
    disk_reader, _ = make_batches(tmp, spec["size"], batch, 1, tok, cache=False)

    def with_loader():
        i = state["i"] = (state["i"] + 1) % len(batches)
        b = disk_reader.batch([(i * batch + j) % len(disk_reader) for j in range(batch)], tok)
        return steps["fused"](b)

    cases.append(runner.Case("fused+loader", with_loader, group="train_step", device=device,
                             meta={"batch": batch, "backend": "auto", "loader": "disk, no cache"}))
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
    results = runner.run_cases(cases, warmup=1, repeats=min(args.repeats, 3) if args.quick else args.repeats,
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
    js, md = runner.save("train", results, extra=extra, out_dir=args.out)
    with open(md, "a") as fh:
        fh.write(f"\nbatch {batch}, {n_regions:.0f} regions per batch; samples/s: "
                 + ", ".join(f"{k} {v['samples_per_s']:.1f}" for k, v in summary.items())
                 + f"\n\nloss curve over {curve_steps} steps, fused vs reference: max relative "
                 f"difference {curve['max_rel_diff']:.2e} ({'ok' if curve['ok'] else 'NOT within tolerance'})\n")
    print(f"wrote {js} and {md}")
    return 0 if curve["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
