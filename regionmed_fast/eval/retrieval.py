"""Image-to-text, text-to-image and region-to-text retrieval over deduplicated texts.

Identical texts (after whitespace normalisation) are one key; every image carrying a text is a
correct target of it (see metrics.py for the rank and tie rules).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .embed import EvalSet, Tokenizer, encode_texts
from .metrics import dedup_texts, retrieval_ranks, retrieval_summary, topk_chunked

CURVE_MAX_K = 50


def _curve(ranks: torch.Tensor, n_keys: int) -> list[float]:
    kmax = min(CURVE_MAX_K, n_keys)
    return [float((ranks <= k).double().mean()) for k in range(1, kmax + 1)]


def image_embeddings(es: EvalSet) -> dict[str, torch.Tensor]:
    """{"global": [N, D]} plus {"region_aware": [N, D]} when the model has an ROI processor."""
    out = {"global": es.image_global}
    if es.image_fused is not None:
        out["region_aware"] = es.image_fused
    return out


@torch.no_grad()
def evaluate_retrieval(es: EvalSet, model, tokenizer: Tokenizer, *, chunk_size: int = 1024,
                       ks: Sequence[int] = (1, 5, 10), top_texts: int = 3) -> dict:
    """Retrieval numbers for every image embedding the model gives, and for its regions.

    Returns a JSON-able dict: ``image_to_text[kind]`` / ``text_to_image[kind]`` summaries
    (R@K, median/mean rank, n_queries), ``region_to_text`` (when regions and phrases exist),
    recall@K ``curves`` (K = 1..min(50, #keys)), ``top_texts`` (per image, the indices into
    ``unique_texts`` of its best ``top_texts`` texts with the region-aware embedding when
    present) and the dedup counts.
    """
    uniq, tid = dedup_texts(es.texts)
    temb = encode_texts(model, tokenizer, uniq)
    keys_u = torch.arange(len(uniq))
    res: dict = {"n_images": es.n_images, "n_unique_texts": len(uniq), "unique_texts": uniq,
                 "image_to_text": {}, "text_to_image": {}, "curves": {}}
    best_kind = "global"
    for kind, emb in image_embeddings(es).items():
        r_it = retrieval_ranks(emb, temb, tid, keys_u, chunk_size)
        r_ti = retrieval_ranks(temb, emb, keys_u, tid, chunk_size)
        res["image_to_text"][kind] = retrieval_summary(r_it, ks)
        res["text_to_image"][kind] = retrieval_summary(r_ti, ks)
        res["curves"][f"image_to_text/{kind}"] = _curve(r_it, len(uniq))
        res["curves"][f"text_to_image/{kind}"] = _curve(r_ti, es.n_images)
        best_kind = kind
    emb = image_embeddings(es)[best_kind]
    _, idx = topk_chunked(emb, temb, top_texts, chunk_size)
    res["top_texts"] = {"embedding": best_kind, "indices": idx.tolist(),
                        "target": tid.tolist()}
    phrases = [t for t in es.region_texts]
    if es.region is not None and phrases and all(p.strip() for p in phrases):
        runiq, rid = dedup_texts(phrases)
        remb = encode_texts(model, tokenizer, runiq)
        r_rt = retrieval_ranks(es.region, remb, rid, torch.arange(len(runiq)), chunk_size)
        res["region_to_text"] = retrieval_summary(r_rt, ks)
        res["region_to_text"]["n_unique_phrases"] = len(runiq)
        res["curves"]["region_to_text"] = _curve(r_rt, len(runiq))
    elif es.region is None:
        res["region_to_text"] = {"skipped": "the model gives no region embeddings (global-only)"}
    else:
        res["region_to_text"] = {"skipped": "some regions have no text"}
    return res
