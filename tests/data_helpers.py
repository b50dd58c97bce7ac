"""Small on-disk datasets for the data tests (written with Pillow into tmp folders)."""
from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image


def write_image(path: str, w: int, h: int, *, box=None, fmt: str | None = None, seed: int = 0) -> None:
    """Dark noisy image with an optional bright filled rectangle [x1, y1, x2, y2) (ints)."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 40, size=(h, w, 3), dtype=np.uint8)
    if box is not None:
        x1, y1, x2, y2 = (int(v) for v in box)
        img[y1:y2, x1:x2] = 230
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if (fmt or path.rsplit(".", 1)[-1]).lower() in ("jpg", "jpeg"):
        Image.fromarray(img).save(path, quality=95)
    else:
        Image.fromarray(img).save(path)


def record(name: str, w: int, h: int, boxes=((4, 4, 20, 20),), text: str = "an image", **extra) -> dict:
    return {"image": f"images/{name}", "width": w, "height": h, "text": text,
            "regions": [{"bbox": list(b), "text": f"region {i}", "label": f"r{i}"}
                        for i, b in enumerate(boxes)],
            "labels": ["finding"], "source": "test", **extra}


def write_dataset(root: str, records: list, *, images: dict | None = None) -> str:
    """Write ``records`` (dicts, or raw strings for bad lines) to root/annotations.jsonl and a
    default image for every dict record whose image does not exist yet."""
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    for name, (w, h) in (images or {}).items():
        write_image(os.path.join(root, "images", name), w, h)
    with open(os.path.join(root, "annotations.jsonl"), "w") as fh:
        for r in records:
            fh.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return root


def good_dataset(root: str, n: int = 6, w: int = 64, h: int = 48) -> str:
    recs = []
    for i in range(n):
        name = f"img{i}.jpg"
        write_image(os.path.join(root, "images", name), w, h, box=(8, 6, 30, 26), seed=i)
        recs.append(record(name, w, h, boxes=[(8, 6, 30, 26), (35, 10, 60, 40)][: 1 + i % 2],
                           text=f"image number {i}", idx=i))
    return write_dataset(root, recs)
