"""Embed an evaluation split once with a model; every task reuses the result.

Batches come from the one batch path of the data layer (``regionmed_fast.data.batch.
build_batch(..., train=False)``: the whole image resized to the model's size, CLIP-normalised,
boxes scaled alike), so evaluation sees exactly what training's eval path produces. The model
runs in eval mode (dropout off) for the whole pass.

Per image the set keeps, as rows of embeddings (see docs/evaluation.md):

* ``global``: the global embedding (every model);
* ``proposed_boxes``: the region-aware embedding with the model's own proposed boxes
  (``model.propose_boxes``: no annotation; every image gets the same number of boxes);
* ``oracle_boxes``: the region-aware embedding with the annotated boxes; only meaningful on
  images that have annotated boxes (``has_boxes``), and reported apart from the headline.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch

from regionmed_fast.data.batch import build_batch

Tokenizer = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]

GLOBAL, PROPOSED, ORACLE = "global", "proposed_boxes", "oracle_boxes"


def model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """``model.eval()`` inside, the previous mode restored after (dropout off: deterministic)."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def has_regions(model) -> bool:
    """True for a model with an RoI processor (region-aware rows exist)."""
    return getattr(model, "roi", None) is not None


@torch.no_grad()
def encode_texts(model, tokenizer: Tokenizer, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """L2-normalised text embeddings float32 [len(texts), D] (on the CPU), in eval mode."""
    if not texts:
        raise ValueError("encode_texts: no texts given")
    dev = model_device(model)
    out = []
    with eval_mode(model):
        for i in range(0, len(texts), batch_size):
            ids, mask = tokenizer(list(texts[i:i + batch_size]))
            out.append(model.encode_text(ids.to(dev), mask.to(dev), normalize=True).float().cpu())
    return torch.cat(out)


@dataclass
class RegionRows:
    """Region-aware embeddings of one box source over N images (K boxes in all)."""

    fused: torch.Tensor          # float32 [N, D] region-aware image embedding
    boxes: list[torch.Tensor]    # N x float32 [K_i, 4], pixels of the model's input image
    region: torch.Tensor         # float32 [K, D] one embedding per box
    region_image: torch.Tensor   # int64 [K] image index of each box

    def subset(self, idx: list[int]) -> "RegionRows":
        keep = torch.tensor(idx, dtype=torch.long)
        pos = {old: new for new, old in enumerate(idx)}
        sel = torch.tensor([pos.get(int(i), -1) >= 0 for i in self.region_image], dtype=torch.bool)
        return RegionRows(self.fused[keep], [self.boxes[i] for i in idx], self.region[sel],
                          torch.tensor([pos[int(i)] for i in self.region_image[sel]],
                                       dtype=torch.long))


@dataclass
class EvalSet:
    """One split embedded by one model: N images, K annotated regions (image-major)."""

    records: list[dict]
    image_size: int
    texts: list[str]                       # N image texts
    labels: list[list[str]]                # N label lists
    region_texts: list[str]                # K annotated region phrases
    region_labels: list[str]               # K
    region_image: torch.Tensor             # int64 [K] image index of each annotated region
    boxes: list[torch.Tensor]              # N x float32 [K_i, 4] annotated boxes (input pixels)
    image_global: torch.Tensor             # float32 [N, D] L2-normalised
    proposed: RegionRows | None = None     # None for a global-only model
    oracle: RegionRows | None = None       # None for a global-only model
    blank: dict[str, torch.Tensor] = field(default_factory=dict)  # row -> [D] of a blank image

    @property
    def n_images(self) -> int:
        return len(self.records)

    @property
    def has_boxes(self) -> list[bool]:
        return [b.shape[0] > 0 for b in self.boxes]

    def rows(self, oracle: bool = False) -> dict[str, torch.Tensor]:
        """Image embeddings by row name: ``global`` and (region-aware models)
        ``proposed_boxes``; with ``oracle=True`` also ``oracle_boxes``."""
        out = {GLOBAL: self.image_global}
        if self.proposed is not None:
            out[PROPOSED] = self.proposed.fused
        if oracle and self.oracle is not None:
            out[ORACLE] = self.oracle.fused
        return out

    def subset(self, idx: list[int]) -> "EvalSet":
        """The same set restricted to images ``idx`` (in that order)."""
        keep = torch.tensor(idx, dtype=torch.long)
        pos = {old: new for new, old in enumerate(idx)}
        sel = [k for k, i in enumerate(self.region_image.tolist()) if i in pos]
        return replace(
            self, records=[self.records[i] for i in idx], texts=[self.texts[i] for i in idx],
            labels=[self.labels[i] for i in idx], region_texts=[self.region_texts[k] for k in sel],
            region_labels=[self.region_labels[k] for k in sel],
            region_image=torch.tensor([pos[int(self.region_image[k])] for k in sel],
                                      dtype=torch.long),
            boxes=[self.boxes[i] for i in idx], image_global=self.image_global[keep],
            proposed=None if self.proposed is None else self.proposed.subset(idx),
            oracle=None if self.oracle is None else self.oracle.subset(idx))


def load_batch(records: Sequence[dict], image_size: int) -> dict:
    """The eval batch of ``records`` (the data layer's one batch path, ``train=False``)."""
    return build_batch(list(records), image_size=image_size, train=False)


class _Acc:
    """Accumulates one box source's outputs over batches."""

    def __init__(self) -> None:
        self.fused: list[torch.Tensor] = []
        self.region: list[torch.Tensor] = []
        self.boxes: list[torch.Tensor] = []

    def add(self, fused, region, boxes, counts) -> None:
        self.fused.append(fused.float().cpu())
        self.region.append(region.float().cpu())
        boxes, counts = boxes.cpu(), counts.cpu()
        self.boxes += [boxes[j, :int(c)].float().clone() for j, c in enumerate(counts)]

    def rows(self) -> RegionRows:
        region_image = torch.tensor([i for i, b in enumerate(self.boxes) for _ in range(b.shape[0])],
                                    dtype=torch.long)
        return RegionRows(torch.cat(self.fused), self.boxes, torch.cat(self.region), region_image)


def _region_rows(model, feats, boxes, counts):
    _, fused, region, _ = model.encode_regions(feats, boxes, box_counts=counts)
    return fused, region


@torch.no_grad()
def embed_split(model, records: Sequence[dict], image_size: int, batch_size: int = 32, *,
                proposer: dict | None = None) -> EvalSet:
    """Embed ``records`` (manifest records as ``read_manifest`` returns them) in order.

    ``model``: a RegionMedCLIP (or anything with its ``image_features`` / ``encode_image`` /
    ``encode_regions`` / ``propose_boxes`` methods and a ``roi`` attribute, None when
    global-only). ``proposer``: overrides of the model's proposer settings.
    """
    if not records:
        raise ValueError("embed_split: the split has no images")
    dev = model_device(model)
    region_aware = has_regions(model)
    proposer = dict(proposer or {})
    glob: list[torch.Tensor] = []
    prop, orac = _Acc(), _Acc()
    boxes_all: list[torch.Tensor] = []
    texts, labels, region_texts, region_labels = [], [], [], []
    blank: dict[str, torch.Tensor] = {}
    with eval_mode(model):
        for i in range(0, len(records), batch_size):
            batch = load_batch(records[i:i + batch_size], image_size)
            feats = model.image_features(batch["images"].to(dev))
            glob.append(model.encode_image(feats).float().cpu())
            counts = batch["box_counts"]
            boxes_all += [batch["boxes"][j, :int(c)].clone() for j, c in enumerate(counts)]
            texts += batch["texts"]
            labels += [list(ls) for ls in batch["labels"]]
            region_texts += [t for ts in batch["region_texts"] for t in ts]
            region_labels += [t for ts in batch["region_labels"] for t in ts]
            if region_aware:
                pboxes, pcounts = model.propose_boxes(feats, **proposer)
                prop.add(*_region_rows(model, feats, pboxes, pcounts), pboxes, pcounts)
                oboxes, ocounts = batch["boxes"].to(dev), counts.to(dev)
                orac.add(*_region_rows(model, feats, oboxes, ocounts), oboxes, ocounts)
        # a blank image (the normalisation's mean colour): the image-free VQA control
        feats = model.image_features(torch.zeros(1, 3, image_size, image_size, device=dev))
        blank[GLOBAL] = model.encode_image(feats).float().cpu()[0]
        if region_aware:
            blank[PROPOSED] = model.encode_image(feats, boxes="auto",
                                                 proposer=proposer).float().cpu()[0]
    region_image = torch.tensor([i for i, b in enumerate(boxes_all) for _ in range(b.shape[0])],
                                dtype=torch.long)
    return EvalSet(
        records=list(records), image_size=image_size, texts=texts, labels=labels,
        region_texts=region_texts, region_labels=region_labels, region_image=region_image,
        boxes=boxes_all, image_global=torch.cat(glob),
        proposed=prop.rows() if region_aware else None,
        oracle=orac.rows() if region_aware else None, blank=blank)
