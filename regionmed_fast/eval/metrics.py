"""Evaluation metrics: exact chunked retrieval (ranks, recall@K, median rank, top-k) with text
deduplication, and classification metrics (accuracy, balanced accuracy, macro AUROC, confusion
matrix). Plain torch, no sklearn.

Conventions (also in docs/evaluation.md):

* Deduplication: texts are compared after collapsing runs of whitespace and stripping the ends
  (case is kept). Identical texts become ONE key; every image carrying that text is a correct
  target of it, and for image-to-text the image's one correct key is its deduplicated text.
* Targets are given as group ids: query ``i`` and key ``j`` match when ``query_group[i] ==
  key_group[j]``. A query's rank is ``1 + #{non-target keys j : s_ij >= max_{t target} s_it}``:
  the best-scoring target counts, and ties with non-targets are counted AGAINST the model
  (pessimistic), so a collapsed model whose embeddings are all equal gets the worst rank, not
  the best. recall@K = mean(rank <= K). Median rank = the usual median (mean of the two middle
  ranks when the count is even). A query with no target in the keys is an error.
* ``topk_chunked`` orders by score descending, then key index ascending (deterministic ties).
* Similarities are computed tile by tile (``chunk_size`` queries x ``chunk_size`` keys), so an
  N x M similarity matrix never exists in memory; the result equals the dense computation
  exactly (same dot products, no approximation).
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch

__all__ = [
    "normalize_text", "dedup_texts", "retrieval_ranks", "recall_at_k", "median_rank",
    "retrieval_summary", "topk_chunked", "accuracy", "balanced_accuracy", "confusion_matrix",
    "binary_auroc", "macro_auroc", "bootstrap_indices", "percentile_interval", "mean_interval",
    "macro_auroc_resampled", "verdict", "difference", "mean_difference",
]

_WS = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """The key under which texts are deduplicated: whitespace collapsed and stripped."""
    return _WS.sub(" ", text).strip()


def dedup_texts(texts: Sequence[str]) -> tuple[list[str], torch.Tensor]:
    """Unique texts in first-seen order and, for each input text, the index of its unique text.

    Returns ``(unique, index)`` with ``index`` int64 ``[len(texts)]``.
    """
    seen: dict[str, int] = {}
    unique: list[str] = []
    index = []
    for t in texts:
        if not isinstance(t, str):
            raise TypeError(f"dedup_texts: expected str, got {type(t).__name__}: {t!r}")
        key = normalize_text(t)
        if key not in seen:
            seen[key] = len(unique)
            unique.append(key)
        index.append(seen[key])
    return unique, torch.tensor(index, dtype=torch.long)


def _check_pair(query: torch.Tensor, keys: torch.Tensor) -> None:
    if query.dim() != 2 or keys.dim() != 2:
        raise ValueError(f"query and keys must be 2-D [N, D] / [M, D], got {tuple(query.shape)} "
                         f"and {tuple(keys.shape)}")
    if query.shape[1] != keys.shape[1]:
        raise ValueError(f"embedding widths differ: query D={query.shape[1]}, keys D={keys.shape[1]}")
    if query.dtype != keys.dtype:
        raise ValueError(f"query dtype {query.dtype} != keys dtype {keys.dtype}")
    # a NaN score compares false with everything and would rank first: refuse it
    for name, t in (("query", query), ("keys", keys)):
        if not torch.isfinite(t).all():
            bad = int(torch.nonzero(~torch.isfinite(t).all(dim=1))[0])
            raise ValueError(f"{name} row {bad} has a NaN or infinite value")


def _chunk(chunk_size: int | None, n: int) -> int:
    if chunk_size is None:
        return max(n, 1)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return chunk_size


@torch.no_grad()
def retrieval_ranks(query: torch.Tensor, keys: torch.Tensor, query_group: torch.Tensor,
                    key_group: torch.Tensor, chunk_size: int | None = 1024) -> torch.Tensor:
    """1-based rank of each query's best target among ``keys`` (pessimistic ties, see module doc).

    query: [N, D], keys: [M, D] (same float dtype; similarity is the dot product, so pass
    L2-normalised embeddings for cosine). query_group: int64 [N], key_group: int64 [M].
    chunk_size: tile side; ``None`` = one tile (dense). Returns int64 [N].
    """
    _check_pair(query, keys)
    query_group = torch.as_tensor(query_group, dtype=torch.long, device=query.device)
    key_group = torch.as_tensor(key_group, dtype=torch.long, device=keys.device)
    if query_group.shape != (query.shape[0],) or key_group.shape != (keys.shape[0],):
        raise ValueError(f"query_group {tuple(query_group.shape)} / key_group {tuple(key_group.shape)} "
                         f"must be [N]={query.shape[0]} / [M]={keys.shape[0]}")
    n, m = query.shape[0], keys.shape[0]
    cq, ck = _chunk(chunk_size, n), _chunk(chunk_size, m)
    ranks = torch.empty(n, dtype=torch.long, device=query.device)
    for q0 in range(0, n, cq):
        q = query[q0:q0 + cq]
        qg = query_group[q0:q0 + cq]
        # pass 1: best target score per query
        best = torch.full((q.shape[0],), -math.inf, dtype=q.dtype, device=q.device)
        for k0 in range(0, m, ck):
            s = q @ keys[k0:k0 + ck].T
            tgt = qg[:, None] == key_group[None, k0:k0 + ck]
            best = torch.maximum(best, s.masked_fill(~tgt, -math.inf).amax(dim=1))
        missing = torch.isinf(best) & (best < 0)
        if missing.any():
            bad = int(torch.nonzero(missing)[0]) + q0
            raise ValueError(f"query {bad} (group {int(query_group[bad])}) has no target among the keys")
        # pass 2: non-targets scoring at least as high as the best target
        ahead = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        for k0 in range(0, m, ck):
            s = q @ keys[k0:k0 + ck].T
            non = qg[:, None] != key_group[None, k0:k0 + ck]
            ahead += ((s >= best[:, None]) & non).sum(dim=1)
        ranks[q0:q0 + cq] = ahead + 1
    return ranks


def recall_at_k(ranks: torch.Tensor, k: int) -> float:
    """Fraction of queries whose rank is <= k."""
    if ranks.numel() == 0:
        return float("nan")
    return float((ranks <= k).double().mean())


def median_rank(ranks: torch.Tensor) -> float:
    """Median of the ranks (mean of the two middle values when the count is even)."""
    if ranks.numel() == 0:
        return float("nan")
    r = torch.sort(ranks.double()).values
    n = r.numel()
    return float(r[n // 2]) if n % 2 else float((r[n // 2 - 1] + r[n // 2]) / 2)


def retrieval_summary(ranks: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """``{"R@1": .., "R@5": .., "R@10": .., "median_rank": .., "mean_rank": .., "n_queries": ..}``."""
    out = {f"R@{k}": recall_at_k(ranks, k) for k in ks}
    out["median_rank"] = median_rank(ranks)
    out["mean_rank"] = float(ranks.double().mean()) if ranks.numel() else float("nan")
    out["n_queries"] = int(ranks.numel())
    return out


@torch.no_grad()
def topk_chunked(query: torch.Tensor, keys: torch.Tensor, k: int,
                 chunk_size: int | None = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k keys per query, tile by tile.

    Returns ``(scores [N, k'], indices int64 [N, k'])`` with ``k' = min(k, M)``, ordered by
    score descending then key index ascending.
    """
    _check_pair(query, keys)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n, m = query.shape[0], keys.shape[0]
    k = min(k, m)
    cq, ck = _chunk(chunk_size, n), _chunk(chunk_size, m)
    all_s, all_i = [], []
    for q0 in range(0, n, cq):
        q = query[q0:q0 + cq]
        best_s = q.new_empty((q.shape[0], 0))
        best_i = torch.empty((q.shape[0], 0), dtype=torch.long, device=q.device)
        for k0 in range(0, m, ck):
            s = q @ keys[k0:k0 + ck].T
            idx = torch.arange(k0, k0 + s.shape[1], device=q.device).expand(q.shape[0], -1)
            # running best (lower indices, already in (score desc, index asc) order) first, then
            # the tile in index order: a stable descending sort keeps index-ascending ties
            cat_s = torch.cat([best_s, s], dim=1)
            cat_i = torch.cat([best_i, idx], dim=1)
            order = torch.sort(cat_s, dim=1, descending=True, stable=True).indices[:, :k]
            best_s = torch.gather(cat_s, 1, order)
            best_i = torch.gather(cat_i, 1, order)
        all_s.append(best_s)
        all_i.append(best_i)
    if not all_s:
        return query.new_empty((0, k)), torch.empty((0, k), dtype=torch.long, device=query.device)
    return torch.cat(all_s), torch.cat(all_i)


# ----------------------------------------------------------------------------- classification

def _as_long(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if t.is_floating_point():
        raise ValueError(f"{name} must hold integer class ids, got {t.dtype}")
    return t.long()


def accuracy(y_true, y_pred) -> float:
    """Fraction of exact matches. y_true, y_pred: int [N]."""
    t, p = _as_long(y_true, "y_true"), _as_long(y_pred, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true {tuple(t.shape)} and y_pred {tuple(p.shape)} differ in length")
    return float((t == p).double().mean()) if t.numel() else float("nan")


def confusion_matrix(y_true, y_pred, num_classes: int | None = None) -> torch.Tensor:
    """int64 [C, C]: rows are true classes, columns predicted classes."""
    t, p = _as_long(y_true, "y_true"), _as_long(y_pred, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true {tuple(t.shape)} and y_pred {tuple(p.shape)} differ in length")
    c = num_classes if num_classes is not None else int(max(t.max(), p.max()) + 1) if t.numel() else 0
    if t.numel() and (min(t.min(), p.min()) < 0 or max(t.max(), p.max()) >= c):
        raise ValueError(f"class ids must lie in [0, {c})")
    return torch.bincount(t * c + p, minlength=c * c).reshape(c, c)


def balanced_accuracy(y_true, y_pred, num_classes: int | None = None) -> float:
    """Mean per-class recall over the classes that occur in y_true (sklearn's definition)."""
    cm = confusion_matrix(y_true, y_pred, num_classes).double()
    support = cm.sum(dim=1)
    present = support > 0
    if not present.any():
        return float("nan")
    return float((cm.diagonal()[present] / support[present]).mean())


def binary_auroc(y: torch.Tensor, score: torch.Tensor) -> float:
    """Area under the ROC curve = P(score_pos > score_neg) + 1/2 P(tie) (Mann-Whitney, average
    ranks for ties). y: bool/int [N] (1 = positive), score: float [N]. NaN when a class is absent."""
    y = torch.as_tensor(y).bool().flatten()
    s = torch.as_tensor(score, dtype=torch.float64).flatten()
    if y.shape != s.shape:
        raise ValueError(f"labels {tuple(y.shape)} and scores {tuple(s.shape)} differ in length")
    if torch.isnan(s).any():
        raise ValueError("binary_auroc: scores contain NaN")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    sorted_s, order = torch.sort(s)
    # average 1-based rank over each run of equal scores
    _, inverse, counts = torch.unique_consecutive(sorted_s, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    avg = ends - (counts.double() - 1) / 2
    ranks = torch.empty_like(s)
    ranks[order] = avg[inverse]
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def macro_auroc(y_true, scores: torch.Tensor) -> tuple[float, list[float]]:
    """One-vs-rest AUROC per class, averaged over classes that have both positives and negatives.

    y_true: int [N] class ids, scores: float [N, C]. Returns ``(macro, per_class)``; a class
    without positives or negatives has NaN in ``per_class`` and is left out of the mean.
    """
    t = _as_long(y_true, "y_true")
    scores = torch.as_tensor(scores)
    if scores.dim() != 2 or scores.shape[0] != t.shape[0]:
        raise ValueError(f"scores must be [N={t.shape[0]}, C], got {tuple(scores.shape)}")
    per = [binary_auroc(t == c, scores[:, c]) for c in range(scores.shape[1])]
    valid = [a for a in per if not math.isnan(a)]
    return (sum(valid) / len(valid) if valid else float("nan")), per


# ----------------------------------------------------------------------------- intervals

def bootstrap_indices(n: int, n_boot: int = 1000, seed: int = 0) -> torch.Tensor:
    """int64 [n_boot, n]: resamples (with replacement) of ``n`` items from a seeded generator,
    so the same ``(n, n_boot, seed)`` gives the same intervals in every process."""
    if n < 1 or n_boot < 1:
        raise ValueError(f"bootstrap needs n >= 1 and n_boot >= 1, got n={n}, n_boot={n_boot}")
    g = torch.Generator().manual_seed(int(seed))
    return torch.randint(0, n, (n_boot, n), generator=g)


def percentile_interval(samples: torch.Tensor, level: float = 0.95) -> list[float]:
    """The central ``level`` percentile interval of bootstrap ``samples`` (NaNs dropped)."""
    s = samples.double()
    s = s[~torch.isnan(s)]
    if s.numel() == 0:
        return [float("nan"), float("nan")]
    q = torch.tensor([(1 - level) / 2, 1 - (1 - level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(s, q).tolist()
    return [lo, hi]


def mean_interval(values: torch.Tensor, idx: torch.Tensor, level: float = 0.95) -> list[float]:
    """Bootstrap interval of the mean of per-item ``values`` [n] over resamples ``idx``
    [n_boot, n] (pass the difference of two paired value vectors for a paired interval)."""
    return percentile_interval(values.double()[idx].mean(dim=1), level)


def macro_auroc_resampled(y_true, scores: torch.Tensor, idx: torch.Tensor,
                          block: int = 4096) -> torch.Tensor:
    """Macro AUROC (as :func:`macro_auroc`) of every bootstrap resample ``idx`` [n_boot, n]
    at once -> float64 [n_boot].

    A resample counts item ``i`` ``c_i`` times, so its AUROC for class ``k`` is
    ``sum_{i pos, j neg} c_i c_j H(s_i - s_j) / (sum_pos c_i * sum_neg c_j)`` with ``H`` = 1 for
    greater, 1/2 for ties: one matrix product per class over the pairs of the full set (in
    blocks of ``block`` negatives), instead of a sort per resample.
    """
    t = _as_long(y_true, "y_true")
    s = torch.as_tensor(scores, dtype=torch.float64)
    n_boot, n = idx.shape
    counts = torch.zeros(n_boot, n, dtype=torch.float64)
    counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))
    per = []
    for c in range(s.shape[1]):
        pos, neg = t == c, t != c
        if not pos.any() or not neg.any():
            continue
        sp, sn = s[pos, c], s[neg, c]
        cp, cn = counts[:, pos], counts[:, neg]
        num = torch.zeros(n_boot, dtype=torch.float64)
        for j0 in range(0, sn.numel(), block):
            blk = sn[j0:j0 + block]
            h = (sp[:, None] > blk[None]).double() + 0.5 * (sp[:, None] == blk[None]).double()
            num += ((cp @ h) * cn[:, j0:j0 + block]).sum(1)
        den = cp.sum(1) * cn.sum(1)
        per.append(torch.where(den > 0, num / den.clamp_min(1), torch.full_like(num, math.nan)))
    if not per:
        return torch.full((n_boot,), math.nan, dtype=torch.float64)
    return torch.stack(per, 1).nanmean(1)


def verdict(interval: Sequence[float]) -> str:
    """How to say a difference: ``"higher"`` / ``"lower"`` only when its interval excludes 0,
    otherwise ``"cannot be told apart"``."""
    lo, hi = interval
    if lo != lo or hi != hi:
        return "cannot be told apart"
    if lo > 0:
        return "higher"
    if hi < 0:
        return "lower"
    return "cannot be told apart"


def difference(full: float, samples: torch.Tensor, level: float = 0.95) -> dict:
    """A difference on the full set with the interval of its bootstrap ``samples`` (each the
    difference on one resample, both sides on the same items: paired):
    ``{"diff", "ci95", "verdict"}``."""
    ci = percentile_interval(samples, level)
    return {"diff": float(full), "ci95": ci, "verdict": verdict(ci)}


def mean_difference(a: torch.Tensor, b: torch.Tensor, idx: torch.Tensor,
                    level: float = 0.95) -> dict:
    """Paired difference of the means of per-item values ``a`` and ``b`` [n] (for example 0/1
    correctness of two rows on the same queries) over resamples ``idx``."""
    d = a.double() - b.double()
    return difference(float(d.mean()), d[idx].mean(dim=1), level)
