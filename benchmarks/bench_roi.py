"""Benchmark of the ROI hot path: RoIAlign + mean over bins + gated fusion (docs/roi.md).

Baseline (what a user picks instead): ``torchvision.ops.roi_align`` on NCHW features (ViT tokens
permuted to NCHW first), then mean over the S x S bins and the sigmoid gate in PyTorch. Against
it, in the same run: our ``reference`` backend, and ``cpu`` (on a CPU) or ``triton`` / ``cuda``
(on a GPU, float32 and bfloat16). Forward (no grad) and forward+backward (gradients for the
features, the global feature and the gate), with peak memory.

Shapes: ViT-B/16 at 224 px (B=32, C=768, 14x14 NHWC tokens, 8 boxes per image, S=7,
sampling_ratio=2, spatial_scale=1/16), a training-sized call as the model makes it (B=256 images on
a GPU, 64 on a CPU, 4 boxes each, C=768, 14x14 tokens, S=2, sampling_ratio=2, aligned; fwd+bwd
only) and a CNN stage (B=8, C=256, 56x56 NCHW, spatial_scale=1/4). On a GPU ``--quick`` keeps
these shapes (they take milliseconds) with fewer repeats; on a CPU it shrinks them.
Peak memory on the CPU is the resident-set peak measured in a child process with glibc's mmap
threshold pinned (MALLOC_MMAP_THRESHOLD_), so that each large tensor shows up; times are taken
in the parent with the default allocator.
Floor: the bytes that must move (read the features once; with backward also write their
gradient once) at the memory bandwidth measured in the same run by a copy.

    python benchmarks/bench_roi.py [--quick] [--device cpu|cuda] [--repeats N] [--cases vit,train,cnn,align]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import runner  # noqa: E402
import torchvision  # noqa: E402

from regionmed_fast.ops import roi_pool_fuse  # noqa: E402
from regionmed_fast.ops.roi import available_backends, roi_align  # noqa: E402


def make_boxes(batch: int, per_image: int, image_size: int, gen: torch.Generator) -> torch.Tensor:
    """``[B * per_image, 5]`` rois in image pixels, sides between 1/14 and 1/2 of the image."""
    k = batch * per_image
    wh = torch.empty(k, 2).uniform_(image_size / 14, image_size / 2, generator=gen)
    xy = torch.rand(k, 2, generator=gen) * (image_size - wh)
    idx = torch.arange(batch).repeat_interleave(per_image).float()[:, None]
    return torch.cat([idx, xy, xy + wh], dim=1)


def torchvision_path(features, rois, glob, w, b, S, scale, sr, layout, aligned=False):
    """What a user writes without this library: permute to NCHW, RoIAlign, mean, gate."""
    f = features.permute(0, 3, 1, 2) if layout == "nhwc" else features
    r = torchvision.ops.roi_align(f, rois, S, scale, sr, aligned).mean(dim=(2, 3))
    g = glob.index_select(0, rois[:, 0].long())
    a = torch.sigmoid(r @ w[0] + g @ w[1] + b)
    return a[:, None] * r + (1 - a[:, None]) * g


def bandwidth_gbs(device: str, nbytes: int = 256 << 20) -> float:
    """Copy bandwidth (read + write) in GB/s, the floor's denominator."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    times = runner.time_fn(lambda: dst.copy_(src), device, warmup=2, repeats=5, max_seconds=5)
    return 2 * nbytes / (min(times) * 1e-3) / 1e9


def cases_for(*, B: int, C: int, H: int, W: int, per_image: int, S: int, sr: int, image: int,
              layout: str, device: str, dtype: torch.dtype, backends: list[str], gbs: float,
              aligned: bool = False, modes: tuple[str, ...] = ("fwd", "fwd+bwd"), label: str = ""):
    gen = torch.Generator().manual_seed(0)
    scale = H / image
    shape = (B, H * W, C) if layout == "nhwc" else (B, C, H, W)
    feats = torch.randn(*shape, generator=gen).to(device, dtype)
    rois = make_boxes(B, per_image, image, gen).to(device)
    glob = torch.randn(B, C, generator=gen).to(device, dtype)
    w = (0.02 * torch.randn(2, C, generator=gen)).to(device, dtype)
    b = torch.zeros(1, device=device, dtype=dtype)
    up = torch.randn(rois.shape[0], C, generator=gen).to(device, dtype)
    grid = (H, W)
    tv_feats = feats.view(B, H, W, C) if layout == "nhwc" else feats
    tv_dtype = dtype
    if dtype != torch.float32:
        try:  # torchvision's CUDA kernel lacks some low-precision types: upcast, as a user would
            torch.ops.torchvision.roi_align(tv_feats.permute(0, 3, 1, 2) if layout == "nhwc" else tv_feats,
                                            rois.to(dtype), 1.0, 2, 2, 2, aligned)
        except Exception:
            tv_dtype = torch.float32

    def ours(backend):
        def run(f, g, ww, bb):
            return roi_pool_fuse(f, rois, g, ww, bb, S, scale, sr, aligned, layout, grid_size=grid, backend=backend)
        return run

    def tv(f, g, ww, bb):
        f4 = f.view(B, H, W, C) if layout == "nhwc" else f
        out = torchvision_path(f4.to(tv_dtype), rois.to(tv_dtype), g.to(tv_dtype), ww.to(tv_dtype),
                               bb.to(tv_dtype), S, scale, sr, layout, aligned)
        return out.to(dtype)

    impls = [("torchvision" + ("" if tv_dtype == dtype else " (fp32 upcast)"), tv)]
    impls += [(f"ours-{be}", ours(be)) for be in backends]
    dname = str(dtype).replace("torch.", "")
    tag = f"{label}{layout} B={B} C={C} {H}x{W} K={rois.shape[0]} S={S} {dname}"
    feat_bytes = feats.numel() * feats.element_size()
    cases, baselines, floors = [], {}, {}
    for mode in modes:
        group = f"{mode} {tag}"
        baselines[group] = impls[0][0]
        floors[group] = (feat_bytes * (1 if mode == "fwd" else 2)) / (gbs * 1e9) * 1e3
        for label, fn in impls:
            if mode == "fwd":
                def call(fn=fn):
                    with torch.no_grad():
                        return fn(feats, glob, w, b)
            else:
                leaves = [t.detach().clone().requires_grad_(True) for t in (feats, glob, w, b)]

                def call(fn=fn, leaves=leaves):
                    z = fn(*leaves)
                    return torch.autograd.grad((z * up).sum(), leaves)
            cases.append(runner.Case(label, call, group=group, device=device,
                                     meta={"mode": mode, "layout": layout, "dtype": dname, "B": B, "C": C,
                                           "H": H, "W": W, "K": int(rois.shape[0]), "S": S,
                                           "aligned": aligned}))
    return cases, baselines, floors


def align_cases(*, B, C, H, W, per_image, S, sr, image, device, backends):
    """Plain RoIAlign on ViT tokens: torchvision (permute + roi_align) vs ours (NHWC, no permute)."""
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randn(B, H * W, C, generator=gen).to(device)
    rois = make_boxes(B, per_image, image, gen).to(device)
    scale = H / image
    group = f"roi_align fwd nhwc B={B} C={C} {H}x{W} K={rois.shape[0]} S={S}"

    def tv():
        with torch.no_grad():
            return torchvision.ops.roi_align(tokens.view(B, H, W, C).permute(0, 3, 1, 2), rois, S, scale, sr, False)

    cases = [runner.Case("torchvision", tv, group=group, device=device)]
    for be in backends:
        def run(be=be):
            with torch.no_grad():
                return roi_align(tokens, rois, S, scale, sr, False, "nhwc", grid_size=(H, W), backend=be)
        cases.append(runner.Case(f"ours-{be}", run, group=group, device=device))
    return cases, {group: "torchvision"}


#: The benchmark's cases (``--cases``): the ViT-B/16 shape, the training-sized call, the CNN stage,
#: plain roi_align on the ViT tokens.
CASES = ("vit", "train", "cnn", "align")


def cpu_peaks_in_child(argv: list[str]) -> dict[str, float]:
    """Peak memory of every case, measured in a child process that runs with glibc's mmap
    threshold pinned: every large tensor then gets fresh pages and the resident-set peak counts
    it (glibc otherwise raises the threshold after the first free and recycles heap pages,
    hiding later allocations). Timing stays in this process, with the default allocator
    behaviour, because fresh pages cost page faults on every call."""
    with tempfile.NamedTemporaryFile(suffix=".json") as fh:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(256 << 10))
        subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--memory-only", fh.name],
                       env=env, check=True)
        with open(fh.name) as rf:
            return json.load(rf)


def main(argv: list[str] | None = None) -> int:
    p = runner.common_args(__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for CPU runs")
    p.add_argument("--cases", default=",".join(CASES),
                   help=f"comma-separated subset of {','.join(CASES)} (default: all)")
    p.add_argument("--memory-only", default=None, metavar="JSON", help=argparse.SUPPRESS)
    raw = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(raw)
    device = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    avail = available_backends(device)
    wanted = ["reference", "cpp"] if device == "cpu" else ["triton", "cuda"]
    backends = [b for b in wanted if avail[b] == "ok"]
    skipped = {b: avail[b] for b in wanted if avail[b] != "ok"}
    for b, why in skipped.items():
        print(f"  (skipping backend {b}: {why})")
    dtypes = [torch.float32] if device == "cpu" else [torch.float32, torch.bfloat16]
    on_gpu = device != "cpu"
    vit = dict(B=32, C=768, H=14, W=14, per_image=8, S=7, sr=2, image=224, layout="nhwc")
    cnn = dict(B=8, C=256, H=56, W=56, per_image=8, S=7, sr=2, image=224, layout="nchw")
    # the model's call (RoIConfig: output_size 2, sampling_ratio 2, aligned); 64 images on a CPU
    # keep the torchvision baseline within the run's time budget
    train = dict(B=256 if on_gpu else 64, C=768, H=14, W=14, per_image=4, S=2, sr=2, image=224, layout="nhwc",
                 aligned=True, modes=("fwd+bwd",), label="train ")
    if args.quick and not on_gpu:
        vit.update(B=4, C=128)
        cnn.update(B=2, C=64)
        train.update(B=8, C=128)
    gbs = bandwidth_gbs(device)
    print(f"bench_roi on {runner.machine_tag()}: copy bandwidth {gbs:.1f} GB/s, threads {torch.get_num_threads()}")
    wanted_cases = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(wanted_cases) - set(CASES))
    if unknown:
        p.error(f"--cases: unknown {unknown}; choose from {', '.join(CASES)}")
    cases, baselines, floors = [], {}, {}
    shapes = {"vit": vit, "train": train, "cnn": cnn}
    for shape in (shapes[c] for c in CASES if c in wanted_cases and c in shapes):
        for dtype in dtypes:
            # the reference backend's gathers at the training size would dominate the run
            be = [b for b in backends if not (b == "reference" and shape is train)]
            c, bl, fl = cases_for(**shape, device=device, dtype=dtype, backends=be, gbs=gbs)
            cases += c
            baselines.update(bl)
            floors.update(fl)
    if "align" in wanted_cases:
        a_shape = {k: vit[k] for k in ("B", "C", "H", "W", "per_image", "S", "sr", "image")}
        c, bl = align_cases(**a_shape, device=device, backends=[b for b in backends if b != "reference"])
        cases += c
        baselines.update(bl)
    repeats = 3 if args.quick else args.repeats
    if args.memory_only:
        peaks = {f"{c.group}|{c.name}": runner.peak_memory_mb(c.fn, c.device) for c in cases}
        with open(args.memory_only, "w") as fh:
            json.dump(peaks, fh)
        return 0
    on_cpu = device == "cpu"
    results = runner.run_cases(cases, warmup=1, repeats=repeats, max_seconds=10 if args.quick else 30,
                               baselines=baselines, floors=floors, memory=not on_cpu)
    if on_cpu:
        peaks = cpu_peaks_in_child(raw)
        for r in results:
            r.peak_mem_mb = peaks.get(f"{r.group}|{r.name}", float("nan"))
        runner.fill_ratios(results, baselines, floors)
    extra = {"bandwidth_gbs": gbs, "skipped_backends": skipped, "quick": args.quick,
             "load_avg": os.getloadavg()}
    json_path, md_path = runner.save("roi", results, extra, out_dir=args.out)
    print(runner.markdown_table(results, "bench_roi"))
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
