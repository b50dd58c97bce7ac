"""Read an evaluation split and embed it once with a model; every task reuses the result.

Images are resized (stretched) to the model's square ``image_size`` and CLIP-normalised; boxes
are scaled by the same per-axis factors, so they stay in pixels of the batch tensor (the batch
format of INTERFACES.md).
"""
from __future__ import annotations

import hashlib
import json
import pathlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

Tokenizer = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]


def read_records(data_dir: str | pathlib.Path) -> list[dict]:
    """Manifest records of ``data_dir/annotations.jsonl`` (the data package's validating reader
    when installed, else a strict minimal one). Each record gets ``_root`` = data_dir."""
    root = pathlib.Path(data_dir)
    try:
        from regionmed_fast.data.manifest import read_manifest  # type: ignore
    except ImportError:
        read_manifest = None
    if read_manifest is not None:
        recs = [dict(r) for r in read_manifest(root)]
    else:
        path = root / "annotations.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no annotations.jsonl in the data folder")
        recs = []
        for ln, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{ln}: not JSON ({e})") from None
            for key in ("image", "text"):
                if key not in r:
                    raise ValueError(f"{path}:{ln}: missing field {key!r}")
            r.setdefault("regions", [])
            r.setdefault("labels", [])
            recs.append(r)
    for r in recs:
        r["_root"] = str(root)
    return recs


def _hash_split(key: str, fraction: float) -> str:
    h = int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "test" if h < fraction else "train"


def split_records(records: Sequence[dict], split: str | None, *, group_key: str | None = None,
                  fraction: float = 0.3) -> list[dict]:
    """Records of ``split``.

    ``None`` or ``"all"``: every record. Otherwise the record's own ``"split"`` field decides
    when present; records without one are assigned deterministically by SHA-1 of
    ``record[group_key]`` (e.g. patient_id, so one patient never straddles two splits) or of the
    image path: about ``fraction`` of groups go to "test" (alias "val"), the rest to "train".
    """
    if split in (None, "all"):
        return list(records)
    want = "test" if split == "val" else split
    out = []
    for r in records:
        s = r.get("split")
        if s is None:
            key = str(r.get(group_key, r["image"])) if group_key else r["image"]
            s = _hash_split(key, fraction)
        s = "test" if s == "val" else s
        if s == want:
            out.append(r)
    return out


def load_image(record: dict, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(image float32 [3, S, S] normalised, boxes float32 [K, 4] in pixels of that tensor)."""
    from PIL import Image

    path = pathlib.Path(record["_root"]) / record["image"]
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w0, h0 = im.size
            im = im.resize((image_size, image_size), Image.BILINEAR)  # as the data loader's eval path
            x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    except OSError as e:
        raise OSError(f"{path}: cannot read image ({e})") from None
    x = x.view(image_size, image_size, 3).permute(2, 0, 1).float().div_(255)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    x = (x - mean) / std
    boxes = torch.tensor([r["bbox"] for r in record.get("regions", [])], dtype=torch.float32).view(-1, 4)
    if boxes.numel():
        scale = torch.tensor([image_size / w0, image_size / h0] * 2)
        boxes = (boxes * scale).clamp_(0, image_size)
    return x, boxes


def make_batch(records: Sequence[dict], image_size: int, tokenizer: Tokenizer | None = None) -> dict:
    """A batch in the INTERFACES.md format built from manifest records (no augmentation)."""
    imgs, boxes = zip(*(load_image(r, image_size) for r in records))
    kmax = max((b.shape[0] for b in boxes), default=0)
    padded = torch.zeros(len(records), kmax, 4)
    for i, b in enumerate(boxes):
        padded[i, : b.shape[0]] = b
    batch = {
        "images": torch.stack(imgs),
        "boxes": padded,
        "box_counts": torch.tensor([b.shape[0] for b in boxes], dtype=torch.long),
        "texts": [r["text"] for r in records],
        "region_texts": [[g.get("text", "") for g in r.get("regions", [])] for r in records],
        "labels": [list(r.get("labels", [])) for r in records],
        "region_labels": [[g.get("label", "") for g in r.get("regions", [])] for r in records],
        "meta": [{k: v for k, v in r.items() if k not in ("image", "text", "regions", "labels", "_root")}
                 for r in records],
    }
    if tokenizer is not None:
        batch["text_ids"], batch["text_mask"] = tokenizer(batch["texts"])
        flat = [t for ts in batch["region_texts"] for t in ts]
        if flat:
            batch["region_text_ids"], batch["region_text_mask"] = tokenizer(flat)
        else:
            ids, mask = tokenizer(["x"])
            batch["region_text_ids"], batch["region_text_mask"] = ids[:0], mask[:0]
    return batch


def model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
def encode_texts(model, tokenizer: Tokenizer, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """L2-normalised text embeddings float32 [len(texts), D] (on the CPU)."""
    dev = model_device(model)
    out = []
    for i in range(0, len(texts), batch_size):
        ids, mask = tokenizer(list(texts[i:i + batch_size]))
        out.append(model.encode_text(ids.to(dev), mask.to(dev), normalize=True).float().cpu())
    if not out:
        raise ValueError("encode_texts: no texts given")
    return torch.cat(out)


@dataclass
class EvalSet:
    """One split embedded by one model. N images, K regions (image-major order)."""

    records: list[dict]
    image_size: int
    texts: list[str]                       # N image texts
    labels: list[list[str]]                # N label lists
    region_texts: list[str]                # K region phrases
    region_labels: list[str]               # K
    region_image: torch.Tensor             # int64 [K] image index of each region
    boxes: list[torch.Tensor]              # N x float32 [K_i, 4] pixels of the batch image
    image_global: torch.Tensor             # float32 [N, D] L2-normalised
    image_fused: torch.Tensor | None       # float32 [N, D] region-aware, None without ROI processor
    region: torch.Tensor | None            # float32 [K, D] region embeddings
    extra: dict = field(default_factory=dict)

    @property
    def n_images(self) -> int:
        return len(self.records)


@torch.no_grad()
def embed_split(model, records: Sequence[dict], tokenizer: Tokenizer, image_size: int,
                batch_size: int = 32) -> EvalSet:
    """Run ``model.forward`` over the records in order and keep the image / region embeddings."""
    if not records:
        raise ValueError("embed_split: the split has no images")
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    dev = model_device(model)
    glob, fused, region = [], [], []
    boxes_all: list[torch.Tensor] = []
    try:
        for i in range(0, len(records), batch_size):
            recs = records[i:i + batch_size]
            batch = make_batch(recs, image_size, tokenizer)
            out = model(_to(batch, dev))
            glob.append(out["image_global"].float().cpu())
            fused.append(None if out.get("image_fused") is None else out["image_fused"].float().cpu())
            if int(batch["box_counts"].sum()):
                region.append(None if out.get("region") is None else out["region"].float().cpu())
            for j, c in enumerate(batch["box_counts"].tolist()):
                boxes_all.append(batch["boxes"][j, :c].clone())
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    region_image = torch.tensor([i for i, b in enumerate(boxes_all) for _ in range(b.shape[0])], dtype=torch.long)
    has_fused = all(f is not None for f in fused)
    has_region = bool(region) and all(r is not None for r in region)
    return EvalSet(
        records=list(records), image_size=image_size,
        texts=[r["text"] for r in records], labels=[list(r.get("labels", [])) for r in records],
        region_texts=[g.get("text", "") for r in records for g in r.get("regions", [])],
        region_labels=[g.get("label", "") for r in records for g in r.get("regions", [])],
        region_image=region_image, boxes=boxes_all,
        image_global=torch.cat(glob), image_fused=torch.cat(fused) if has_fused else None,
        region=torch.cat(region) if has_region else None,
    )
