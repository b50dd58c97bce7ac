"""Region grounding: (1) box choice - given a region phrase and the image, pick the box among
the image's boxes whose region embedding is most similar to the phrase; (2) pointing game -
the arg-max of ``model.patch_text_similarity`` for the phrase must fall inside a box that
carries the phrase.

Rules: phrases are deduplicated per image (a phrase carried by several boxes of one image is
one query, and any of those boxes is a correct answer). Box choice only counts images whose
boxes carry at least two different phrases (otherwise it is trivially right); it is correct
when the best matching box scores strictly above every box with another phrase (ties count as
wrong). ``chance`` is the mean over queries of (#boxes with the phrase / #boxes). The pointing
game reports the hit rate of the image-centre point as a baseline next to the model's.
"""
from __future__ import annotations

from collections import defaultdict

import torch

from .embed import EvalSet, Tokenizer, encode_texts, make_batch, model_device
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


@torch.no_grad()
def evaluate_grounding(es: EvalSet, model, tokenizer: Tokenizer, *, batch_size: int = 16,
                       n_examples: int = 6) -> dict:
    """Box-choice accuracy and pointing-game hit rate; ``examples`` keep a few maps for figures."""
    queries = _queries(es)
    if not queries:
        return {"skipped": "no region phrases in this split"}
    uniq, _ = dedup_texts([q[1] for q in queries])
    pos = {t: i for i, t in enumerate(uniq)}
    pemb = encode_texts(model, tokenizer, uniq)
    res: dict = {"n_phrases": len(uniq)}

    # box choice
    if es.region is None:
        res["box_choice"] = {"skipped": "the model gives no region embeddings (global-only)"}
    else:
        regions_of: dict[int, list[int]] = defaultdict(list)
        for k, img in enumerate(es.region_image.tolist()):
            regions_of[img].append(k)
        correct, chance, n = 0, 0.0, 0
        for img, phrase, ks in queries:
            all_k = regions_of[img]
            others = [k for k in all_k if normalize_text(es.region_texts[k]) != phrase]
            if not others:
                continue
            s = es.region @ pemb[pos[phrase]]
            correct += int(s[ks].max() > s[others].max())
            chance += len(ks) / len(all_k)
            n += 1
        res["box_choice"] = ({"accuracy": correct / n, "chance": chance / n, "n_queries": n} if n else
                             {"skipped": "no image has boxes with two different phrases"})

    # pointing game
    if not hasattr(model, "patch_text_similarity"):
        res["pointing_game"] = {"skipped": "the model has no patch_text_similarity"}
        return res
    dev = model_device(model)
    by_img: dict[int, list[tuple[str, list[int]]]] = defaultdict(list)
    for img, phrase, ks in queries:
        by_img[img].append((phrase, ks))
    imgs = sorted(by_img)
    hits, centre_hits, n = 0, 0, 0
    examples = []
    S = es.image_size
    for i0 in range(0, len(imgs), batch_size):
        chunk = imgs[i0:i0 + batch_size]
        batch = make_batch([es.records[i] for i in chunk], S)
        rep, temb, meta = [], [], []
        for j, img in enumerate(chunk):
            for phrase, ks in by_img[img]:
                rep.append(j)
                temb.append(pemb[pos[phrase]])
                meta.append((img, phrase, ks))
        images = batch["images"][torch.tensor(rep)].to(dev)
        maps = model.patch_text_similarity(images, torch.stack(temb).to(dev)).float().cpu()
        if maps.dim() != 3 or maps.shape[0] != len(rep):
            raise ValueError(f"patch_text_similarity returned {tuple(maps.shape)}, expected [{len(rep)}, h, w]")
        h, w = maps.shape[1:]
        for m, (img, phrase, ks) in zip(maps, meta):
            flat = int(torch.argmax(m))
            y, x = (flat // w + 0.5) * S / h, (flat % w + 0.5) * S / w
            boxes = [es.boxes[img][k - _first_region(es, img)] for k in ks]
            hit = any(_inside(b, x, y) for b in boxes)
            hits += hit
            centre_hits += any(_inside(b, S / 2, S / 2) for b in boxes)
            n += 1
            if len(examples) < n_examples:
                examples.append({"image": img, "phrase": phrase, "point": [x, y], "hit": bool(hit),
                                 "boxes": [b.tolist() for b in boxes], "map": m.tolist()})
    res["pointing_game"] = {"hit_rate": hits / n, "centre_baseline": centre_hits / n, "n_queries": n}
    res["examples"] = examples
    return res


def _first_region(es: EvalSet, img: int) -> int:
    return int((es.region_image < img).sum())
