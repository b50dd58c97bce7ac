"""Data loading throughput: decode + box-aware random resized crop to 224 + flip + normalise.

    python benchmarks/bench_data.py [--quick] [--device cpu|cuda] [--workers 2] [--n 256]

CPU (always): ``make_loader(backend="cpu")`` against the torchvision/PIL DataLoader a user would
write (PIL decode, ``transforms.v2`` RandomResizedCrop + RandomHorizontalFlip on image and
``BoundingBoxes`` + SanitizeBoundingBoxes, ToDtype + Normalize in the workers), same worker
count, batch size, scale range and output (float32 [B, 3, 224, 224] normalised + padded boxes).
Also DALI's CPU pipeline where DALI is installed, and the limit: the JPEG decode rate of the
decoder alone (simplejpeg full-size decode, one process, times the worker count).
Datasets: the real ones under ../shared/data (when present) and synthetic ~512 px JPEGs
generated into a temporary folder.
CUDA (``--device cuda``): DALI ``decoders.image(device="mixed")`` loader (left out, with the
line saying so, where DALI is not installed) and the CPU path with a worker per core (normalising
on the GPU) against ``torchvision.io.decode_jpeg(device="cuda")`` on the batch +
crop/resize/flip/normalise on GPU.
Each case times one full pass (epoch) over the dataset; images/s = images / median time.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import runner  # noqa: E402

from regionmed_fast.data.loader import make_loader  # noqa: E402
from regionmed_fast.errors import MissingDependency  # noqa: E402
from regionmed_fast.data.manifest import read_manifest  # noqa: E402
from regionmed_fast.data.transforms import CLIP_MEAN, CLIP_STD, TRAIN_SCALE  # noqa: E402

SIZE = 224
BATCH = 32
SHARED = os.environ.get("REGIONMED_SHARED_DATA", os.path.join(os.path.dirname(HERE), "..", "shared", "data"))


def synthetic_jpegs(root: str, n: int, size: int = 512, seed: int = 0) -> str:
    """n JPEGs of about size x size (smooth shapes + noise, quality 90) with 1-3 boxes each."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    with open(os.path.join(root, "annotations.jsonl"), "w") as fh:
        for i in range(n):
            w = int(size * rng.uniform(0.8, 1.0)) if i % 2 else size
            h = size if i % 2 else int(size * rng.uniform(0.7, 1.0))
            im = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(0, 80, 3)))
            d = ImageDraw.Draw(im)
            regions = []
            for k in range(int(rng.integers(1, 4))):
                x1, y1 = float(rng.uniform(0, w * 0.7)), float(rng.uniform(0, h * 0.7))
                x2, y2 = min(w, x1 + float(rng.uniform(20, w * 0.3))), min(h, y1 + float(rng.uniform(20, h * 0.3)))
                d.ellipse([x1, y1, x2, y2], fill=tuple(int(v) for v in rng.integers(100, 255, 3)))
                regions.append({"bbox": [round(x1, 1), round(y1, 1), round(x2, 1), round(y2, 1)],
                                "text": f"lesion {k}", "label": "lesion"})
            im = im.filter(ImageFilter.GaussianBlur(2))
            arr = np.asarray(im).astype(np.int16) + rng.integers(-12, 12, (h, w, 3))
            Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(
                os.path.join(root, "images", f"s{i:05d}.jpg"), quality=90)
            fh.write(json.dumps({"image": f"images/s{i:05d}.jpg", "width": w, "height": h,
                                 "text": "synthetic image", "regions": regions,
                                 "labels": ["lesion"], "source": "bench"}) + "\n")
    return root


class TorchvisionDataset(torch.utils.data.Dataset):
    """The baseline: PIL decode + torchvision.transforms.v2 with BoundingBoxes, in the worker."""

    def __init__(self, records: list[dict], train: bool = True):
        from torchvision.transforms import v2

        self.records = records
        self.t = v2.Compose([
            v2.RandomResizedCrop(SIZE, scale=TRAIN_SCALE, antialias=True) if train else v2.Resize((SIZE, SIZE)),
            v2.RandomHorizontalFlip(),
            v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(CLIP_MEAN, CLIP_STD),
            v2.SanitizeBoundingBoxes(min_size=1.0, labels_getter=None),
        ])

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        from PIL import Image
        from torchvision import tv_tensors

        r = self.records[i]
        img = Image.open(r["image_path"]).convert("RGB")
        boxes = tv_tensors.BoundingBoxes(torch.tensor([x["bbox"] for x in r["regions"]]).reshape(-1, 4),
                                         format="XYXY", canvas_size=(img.height, img.width))
        img, boxes = self.t(img, boxes)
        return img, boxes, r["text"], [x["text"] for x in r["regions"]]


def tv_collate(samples):
    imgs = torch.stack([s[0] for s in samples])
    kmax = max(len(s[1]) for s in samples)
    boxes = torch.zeros(len(samples), kmax, 4)
    for i, s in enumerate(samples):
        boxes[i, : len(s[1])] = s[1]
    return {"images": imgs, "boxes": boxes,
            "box_counts": torch.tensor([len(s[1]) for s in samples]),
            "texts": [s[2] for s in samples], "region_texts": [s[3] for s in samples]}


def epoch_fn(loader, device: str = "cpu"):
    """One full pass; touches every batch so lazy work is counted."""
    def run():
        n = 0
        for b in loader:
            n += int(b["images"].shape[0])
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return n
    return run


def other_decode_fn(records: list[dict], which: str):
    """Decode alone with the alternatives: Pillow, torchvision.io.decode_jpeg (CPU)."""
    import io

    from PIL import Image

    datas = [open(r["image_path"], "rb").read() for r in records]
    if which == "pil":
        def run():
            for d in datas:
                with Image.open(io.BytesIO(d)) as im:
                    im.convert("RGB").load()
        return run
    from torchvision.io import decode_jpeg

    tens = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]

    def run_tv():
        for t in tens:
            decode_jpeg(t)
    return run_tv


def decode_fn(records: list[dict], reduced: bool):
    """Decode alone. ``reduced``: at the largest power-of-two reduction that still leaves the
    whole image >= 224 px (what evaluation, which resizes the whole image, can use)."""
    from regionmed_fast.data.decode import decode_image, reduced_min_size

    datas = [open(r["image_path"], "rb").read() for r in records]
    sizes = [reduced_min_size(r["width"], r["height"], SIZE, SIZE) if reduced else None
             for r in records]

    def run():
        for d, s in zip(datas, sizes):
            decode_image(d, min_size=s)
    return run


def tv_cuda_fn(records: list[dict], device: str):
    """torchvision.io.decode_jpeg(device="cuda") on a batch of bytes, then crop + resize + flip +
    normalise on the GPU (same host-drawn geometry and box code as ours)."""
    import torch.nn.functional as F
    from torchvision.io import ImageReadMode, decode_jpeg

    from regionmed_fast.data.sample import geometry, sample_key, target_boxes

    datas = [torch.frombuffer(bytearray(open(r["image_path"], "rb").read()), dtype=torch.uint8)
             for r in records]
    mean = torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1) * 255
    state = {"epoch": 0}

    def run():
        ep = state["epoch"]
        state["epoch"] += 1
        n = 0
        for s in range(0, len(records) - BATCH + 1, BATCH):
            idx = list(range(s, s + BATCH))
            imgs = decode_jpeg([datas[i] for i in idx], mode=ImageReadMode.RGB, device=device)
            outs = []
            for i, im in zip(idx, imgs):
                p = geometry(records[i], True, 0, ep, sample_key(records[i], i))
                target_boxes(records[i], p, SIZE)
                crop = im[:, p.y0:p.y0 + p.h, p.x0:p.x0 + p.w].unsqueeze(0).float()
                o = F.interpolate(crop, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
                outs.append(o.flip(-1) if p.flip else o)
            batch = (torch.cat(outs) - mean) / std
            n += batch.shape[0]
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()
        return n
    return run


def main() -> None:
    ap = runner.common_args(__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--n", type=int, default=256, help="synthetic JPEGs to generate")
    args = ap.parse_args()
    n_syn = 64 if args.quick else args.n
    repeats = 2 if args.quick else args.repeats
    tmp = tempfile.mkdtemp(prefix="bench_data_")
    sets = {"synthetic512": synthetic_jpegs(os.path.join(tmp, "syn"), n_syn)}
    for name in ("covid_chestxray", "ph2_dermoscopy"):
        if os.path.isfile(os.path.join(SHARED, name, "annotations.jsonl")):
            sets[name] = os.path.join(SHARED, name)
    if len(sets) == 1:
        print(f"real datasets not found under {SHARED}; synthetic JPEGs only")
    cases: list[runner.Case] = []
    baselines: dict[str, str] = {}
    counts: dict[str, int] = {}
    keep = []  # loaders stay alive (persistent workers) for the whole run
    for name, root in sets.items():
        records = read_manifest(root)
        counts[name] = len(records) // BATCH * BATCH
        group = f"{name} x{counts[name]}"
        if args.device.startswith("cuda"):
            cases.append(runner.Case("tv decode_jpeg cuda batched", tv_cuda_fn(records, args.device), group, args.device))
            baselines[group] = "tv decode_jpeg cuda batched"
            cores = os.cpu_count() or 1
            cpu_all = make_loader(root, image_size=SIZE, batch_size=BATCH, train=True, backend="cpu",
                                  num_workers=cores, device=args.device)
            keep.append(cpu_all)
            cases.append(runner.Case(f"ours cpu w{cores} (all cores)", epoch_fn(cpu_all, args.device), group, args.device))
            try:
                dali = make_loader(root, image_size=SIZE, batch_size=BATCH, train=True, backend="dali",
                                   num_workers=4, device=args.device)
            except MissingDependency as exc:
                print(f"{group}: DALI case left out: {exc}")
                continue
            keep.append(dali)
            cases.append(runner.Case("ours dali mixed", epoch_fn(dali, args.device), group, args.device))
            continue
        w = args.workers
        tv = torch.utils.data.DataLoader(TorchvisionDataset(records), batch_size=BATCH, shuffle=True,
                                         num_workers=w, collate_fn=tv_collate, drop_last=True,
                                         persistent_workers=w > 0)
        ours = make_loader(root, image_size=SIZE, batch_size=BATCH, train=True, backend="cpu", num_workers=w)
        keep += [tv, ours]
        cases.append(runner.Case(f"torchvision/PIL DataLoader w{w}", epoch_fn(tv), group))
        cases.append(runner.Case(f"ours cpu w{w}", epoch_fn(ours), group))
        try:
            dali_cpu = make_loader(root, image_size=SIZE, batch_size=BATCH, train=True,
                                   backend="dali", num_workers=w, device="cpu")
            keep.append(dali_cpu)
            cases.append(runner.Case(f"ours dali-cpu {w} threads", epoch_fn(dali_cpu), group))
        except MissingDependency as exc:
            print(f"{group}: DALI CPU case left out: {exc}")
        sub = records[: counts[name]]
        dgroup = f"{group} decode-only"  # the limit: not the same output, so no speedup ratio
        cases.append(runner.Case("decode alone (simplejpeg, 1 proc)", decode_fn(sub, False), dgroup))
        cases.append(runner.Case("1/2-size decode alone (1 proc)", decode_fn(sub, True), dgroup))
        cases.append(runner.Case("PIL decode alone (1 proc)", other_decode_fn(sub, "pil"), dgroup))
        cases.append(runner.Case("tv.io.decode_jpeg alone (1 proc)", other_decode_fn(sub, "tv"), dgroup))
        baselines[group] = f"torchvision/PIL DataLoader w{w}"
    torch.set_num_threads(1)  # decode-alone rows are one core; workers set 1 thread themselves
    results = runner.run_cases(cases, warmup=1, repeats=repeats, baselines=baselines, memory=False)
    lines = ["", "| group | case | images/s |", "| --- | --- | ---: |"]
    for r in results:
        n = counts[r.group.split(" x")[0]]
        if not r.error:
            ips = n / (r.median_ms / 1e3)
            if "1 proc" in r.name:
                r.meta["limit_images_per_s_with_workers"] = ips * args.workers
            r.meta["images_per_s"] = ips
            lines.append(f"| {r.group} | {r.name} | {ips:.0f} |")
    table = "\n".join(lines)
    print(table)
    js, md = runner.save("data", results, out_dir=args.out, extra={"workers": args.workers, "batch": BATCH,
                                                 "image_size": SIZE, "images": counts})
    with open(md, "a") as fh:
        fh.write(table + "\n\nDecode-alone rows are one process; the limit with "
                 f"{args.workers} workers is {args.workers}x that rate.\n")
    print(f"wrote {js} and {md}")


if __name__ == "__main__":
    main()
