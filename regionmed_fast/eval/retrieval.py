"""Image-to-text, text-to-image and region-to-text retrieval over deduplicated texts.

Identical texts (after whitespace normalisation) are one key; every image carrying a text is a
correct target of it (see metrics.py for the rank and tie rules). Every R@K comes with a 95 %
bootstrap interval over the queries, and the difference of each row from the ``global`` row
with a paired interval (same resampled queries for both rows).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .embed import GLOBAL, EvalSet, Tokenizer, encode_texts
from .metrics import (bootstrap_indices, dedup_texts, mean_difference, mean_interval,
                      retrieval_ranks, retrieval_summary, topk_chunked)

CURVE_MAX_K = 50


def _curve(ranks: torch.Tensor, n_keys: int) -> list[float]:
    kmax = min(CURVE_MAX_K, n_keys)
    return [float((ranks <= k).double().mean()) for k in range(1, kmax + 1)]


def _summary(ranks: torch.Tensor, ks: Sequence[int], idx: torch.Tensor) -> dict:
    out = retrieval_summary(ranks, ks)
    for k in ks:
        out[f"R@{k}_ci95"] = mean_interval((ranks <= k).double(), idx)
    return out


def _differences(ranks: dict[str, torch.Tensor], ks: Sequence[int], idx: torch.Tensor,
                 direction: str) -> list[dict]:
    out = []
    for row, r in ranks.items():
        if row == GLOBAL:
            continue
        for k in ks:
            d = mean_difference((r <= k).double(), (ranks[GLOBAL] <= k).double(), idx)
            out.append({"metric": f"{direction} R@{k}", "a": row, "b": GLOBAL, **d})
    return out


@torch.no_grad()
def evaluate_retrieval(es: EvalSet, model, tokenizer: Tokenizer, rows: dict[str, torch.Tensor],
                       *, chunk_size: int = 1024, ks: Sequence[int] = (1, 5, 10),
                       top_texts: int = 3, n_boot: int = 1000, seed: int = 0,
                       region_rows: bool = False, keep_items: bool = False) -> dict:
    """Retrieval for every row of image embeddings (``rows``: name -> [N, D]).

    Returns a JSON-able dict: ``image_to_text[row]`` / ``text_to_image[row]`` summaries (R@K,
    R@K_ci95, median/mean rank, n_queries), ``differences`` (each row minus ``global``, paired
    95 % intervals, when both exist), recall@K ``curves``, ``top_texts`` (per image, the indices
    into ``unique_texts`` of its best texts with the last row) and, with ``region_rows`` and
    annotated regions, ``region_to_text`` (the annotated boxes' region embeddings against the
    distinct region phrases: an oracle-box task). ``keep_items``: also ``items``, the per-query
    ranks (int64 tensors, not JSON) with the query keys, for comparisons across models
    (``regionmed_fast.eval.compare``).
    """
    uniq, tid = dedup_texts(es.texts)
    temb = encode_texts(model, tokenizer, uniq)
    keys_u = torch.arange(len(uniq))
    res: dict = {"n_images": es.n_images, "n_unique_texts": len(uniq), "unique_texts": uniq,
                 "rows": list(rows), "image_to_text": {}, "text_to_image": {}, "curves": {}}
    idx_i = bootstrap_indices(es.n_images, n_boot, seed)
    idx_t = bootstrap_indices(len(uniq), n_boot, seed + 1)
    ranks_it, ranks_ti = {}, {}
    for row, emb in rows.items():
        ranks_it[row] = retrieval_ranks(emb, temb, tid, keys_u, chunk_size)
        ranks_ti[row] = retrieval_ranks(temb, emb, keys_u, tid, chunk_size)
        res["image_to_text"][row] = _summary(ranks_it[row], ks, idx_i)
        res["text_to_image"][row] = _summary(ranks_ti[row], ks, idx_t)
        res["curves"][f"image_to_text/{row}"] = _curve(ranks_it[row], len(uniq))
        res["curves"][f"text_to_image/{row}"] = _curve(ranks_ti[row], es.n_images)
    if GLOBAL in rows and len(rows) > 1:
        res["differences"] = (_differences(ranks_it, ks, idx_i, "image_to_text")
                              + _differences(ranks_ti, ks, idx_t, "text_to_image"))
    last = list(rows)[-1]
    _, top = topk_chunked(rows[last], temb, top_texts, chunk_size)
    res["top_texts"] = {"embedding": last, "indices": top.tolist(), "target": tid.tolist()}
    if keep_items:
        res["items"] = {"image_to_text": ranks_it, "text_to_image": ranks_ti,
                        "image_keys": [r["image"] for r in es.records], "text_keys": uniq}
    if region_rows:
        res["region_to_text"] = _region_to_text(es, model, tokenizer, ks, chunk_size, n_boot, seed)
    return res


def _region_to_text(es: EvalSet, model, tokenizer, ks, chunk_size, n_boot, seed) -> dict:
    if es.oracle is None:
        return {"skipped": "the model gives no region embeddings (global-only)"}
    phrases = es.region_texts
    if not phrases:
        return {"skipped": "no annotated regions"}
    if not all(p.strip() for p in phrases):
        return {"skipped": "some regions have no text"}
    runiq, rid = dedup_texts(phrases)
    remb = encode_texts(model, tokenizer, runiq)
    ranks = retrieval_ranks(es.oracle.region, remb, rid, torch.arange(len(runiq)), chunk_size)
    out = _summary(ranks, ks, bootstrap_indices(len(phrases), n_boot, seed + 2))
    out["n_unique_phrases"] = len(runiq)
    out["curve"] = _curve(ranks, len(runiq))
    return out
