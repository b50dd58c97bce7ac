"""Region grounding. The annotated boxes are the ground truth of every task here; only
``box_choice`` also gives them to the model (an oracle-box task, reported apart).

* **Pointing game** (every model): the arg-max patch of the patch-text similarity for a region
  phrase must fall inside a box that carries the phrase; the image-centre point is the baseline.
* **Proposed-box choice** (region-aware models, no annotation given): among the image's
  proposed boxes, the one whose region embedding is most similar to the phrase must find a box
  carrying the phrase (one box's centre inside the other). Chance = mean over queries of the
  share of proposed boxes that find one. ``proposal_hit_rate``: the share of annotated boxes
  found by some proposed box of their image, next to ``proposal_hit_rate_shuffled`` (each
  image's proposals against the next image's annotated boxes: what their sizes and places hit
  by chance).
* **Box choice (oracle boxes)**: among the image's annotated boxes, the one whose region
  embedding is most similar to the phrase must carry it (strictly above every box with another
  phrase: ties are wrong). Only images whose boxes carry >= 2 different phrases count.

Phrases are deduplicated per image: a phrase carried by several boxes of one image is one query.
"""
from __future__ import annotations

from collections import defaultdict

import torch

from .embed import EvalSet, Tokenizer, encode_texts, eval_mode, load_batch, model_device
from .metrics import dedup_texts, normalize_text


def _queries(es: EvalSet) -> list[tuple[int, str, list[int]]]:
    """(image index, phrase, region indices carrying it) for every distinct phrase of each image."""
    per: dict[tuple[int, str], list[int]] = defaultdict(list)
    for k, (img, txt) in enumerate(zip(es.region_image.tolist(), es.region_texts)):
        if txt.strip():
            per[(img, normalize_text(txt))].append(k)
    return [(img, p, ks) for (img, p), ks in per.items()]


def _inside(box: torch.Tensor, x: float, y: float) -> bool:
    return bool(box[0] <= x <= box[2] and box[1] <= y <= box[3])


def _centre(box: torch.Tensor) -> tuple[float, float]:
    return float(box[0] + box[2]) / 2, float(box[1] + box[3]) / 2


@torch.no_grad()
def evaluate_grounding(es: EvalSet, model, tokenizer: Tokenizer, *, batch_size: int = 16,
                       n_examples: int = 6, oracle: bool = False) -> dict:
    """Pointing game and (region-aware models) proposed-box choice; with ``oracle=True`` the
    box choice among the annotated boxes instead. ``examples`` keep a few maps for figures."""
    queries = _queries(es)
    if not queries:
        return {"skipped": "no region phrases in this split"}
    uniq, _ = dedup_texts([q[1] for q in queries])
    pos = {t: i for i, t in enumerate(uniq)}
    pemb = encode_texts(model, tokenizer, uniq)
    res: dict = {"n_phrases": len(uniq)}
    if oracle:
        res["box_choice"] = _box_choice(es, queries, pemb, pos)
        return res
    if es.proposed is None:
        res["proposed_box_choice"] = {"skipped": "the model gives no region embeddings (global-only)"}
    else:
        res["proposed_box_choice"] = _proposed_choice(es, queries, pemb, pos)
    res["pointing_game"], res["examples"] = _pointing(es, model, queries, pemb, pos, batch_size,
                                                      n_examples)
    return res


def _box_choice(es: EvalSet, queries, pemb, pos) -> dict:
    if es.oracle is None:
        return {"skipped": "the model gives no region embeddings (global-only)"}
    regions_of: dict[int, list[int]] = defaultdict(list)
    for k, img in enumerate(es.region_image.tolist()):
        regions_of[img].append(k)
    correct, chance, n = 0, 0.0, 0
    for img, phrase, ks in queries:
        all_k = regions_of[img]
        others = [k for k in all_k if normalize_text(es.region_texts[k]) != phrase]
        if not others:
            continue
        s = es.oracle.region @ pemb[pos[phrase]]
        correct += int(s[ks].max() > s[others].max())
        chance += len(ks) / len(all_k)
        n += 1
    if not n:
        return {"skipped": "no image has boxes with two different phrases"}
    return {"accuracy": correct / n, "chance": chance / n, "n_queries": n}


def _matches(p: torch.Tensor, a: torch.Tensor) -> bool:
    """A proposed box ``p`` finds an annotated box ``a`` when either one's centre lies in the
    other (a small box inside a large finding, or a large box around a small one)."""
    return _inside(a, *_centre(p)) or _inside(p, *_centre(a))


def _hit_rate(proposals: list[torch.Tensor], annotated: list[torch.Tensor]) -> float:
    pairs = [(i, a) for i, boxes in enumerate(annotated) for a in boxes]
    if not pairs:
        return float("nan")
    return sum(any(_matches(p, a) for p in proposals[i]) for i, a in pairs) / len(pairs)


def _proposed_choice(es: EvalSet, queries, pemb, pos) -> dict:
    prop = es.proposed
    first = torch.searchsorted(prop.region_image, torch.arange(es.n_images))
    ann_first = torch.searchsorted(es.region_image, torch.arange(es.n_images))
    hits, chance, n = 0, 0.0, 0
    for img, phrase, ks in queries:
        boxes = prop.boxes[img]
        if boxes.shape[0] == 0:
            continue
        emb = prop.region[first[img]:first[img] + boxes.shape[0]]
        targets = [es.boxes[img][k - int(ann_first[img])] for k in ks]
        holds = [any(_matches(b, t) for t in targets) for b in boxes]
        best = int(torch.argmax(emb @ pemb[pos[phrase]]))
        hits += holds[best]
        chance += sum(holds) / len(holds)
        n += 1
    # baseline: each image's proposals against the next image's annotated boxes
    shifted = prop.boxes[1:] + prop.boxes[:1]
    out = {"proposal_hit_rate": _hit_rate(prop.boxes, es.boxes),
           "proposal_hit_rate_shuffled": _hit_rate(shifted, es.boxes),
           "n_annotated_boxes": sum(b.shape[0] for b in es.boxes)}
    if n:
        out.update({"accuracy": hits / n, "chance": chance / n, "n_queries": n})
    return out


def _pointing(es: EvalSet, model, queries, pemb, pos, batch_size, n_examples):
    if not hasattr(model, "patch_embeddings"):
        return {"skipped": "the model has no patch embeddings"}, []
    dev = model_device(model)
    by_img: dict[int, list[tuple[str, list[int]]]] = defaultdict(list)
    for img, phrase, ks in queries:
        by_img[img].append((phrase, ks))
    imgs = sorted(by_img)
    ann_first = torch.searchsorted(es.region_image, torch.arange(es.n_images))
    hits, centre_hits, n = 0, 0, 0
    examples = []
    S = es.image_size
    with eval_mode(model):
        for i0 in range(0, len(imgs), batch_size):
            chunk = imgs[i0:i0 + batch_size]
            images = load_batch([es.records[i] for i in chunk], S)["images"].to(dev)
            patches = model.patch_embeddings(images).float().cpu()  # [b, h, w, D], one pass
            h, w = patches.shape[1:3]
            for j, img in enumerate(chunk):
                for phrase, ks in by_img[img]:
                    m = patches[j] @ pemb[pos[phrase]]
                    flat = int(torch.argmax(m))
                    y, x = (flat // w + 0.5) * S / h, (flat % w + 0.5) * S / w
                    boxes = [es.boxes[img][k - int(ann_first[img])] for k in ks]
                    hit = any(_inside(b, x, y) for b in boxes)
                    hits += hit
                    centre_hits += any(_inside(b, S / 2, S / 2) for b in boxes)
                    n += 1
                    if len(examples) < n_examples:
                        examples.append({"image": img, "phrase": phrase, "point": [x, y],
                                         "hit": bool(hit), "boxes": [b.tolist() for b in boxes],
                                         "map": m.tolist()})
    return {"hit_rate": hits / n, "centre_baseline": centre_hits / n, "n_queries": n}, examples
