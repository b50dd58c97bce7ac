"""Two training recipes compared over training seeds: mean, spread and a paired interval.

Model A (e.g. region-aware training) and model B (the global-only baseline) are trained with
the same seeds; seed ``k`` of A is paired with seed ``k`` of B (same initial towers, same data
order). Every model is scored on the SAME test items (images, distinct texts or QA pairs), so
seeds and items are crossed. The interval of the difference A - B is a two-level (hierarchical)
percentile bootstrap over both sources of spread:

1. draw the test items with replacement, once per resample, shared by every seed and by both
   models (paired over items);
2. draw the seed pairs with replacement;
3. the resample's difference is the mean over the drawn seed pairs of (A's metric - B's metric),
   each metric computed on the drawn items.

The point estimate is the mean over seeds of the difference on the full test set. A difference
is a finding only when its 95 % interval excludes 0 AND at least :data:`MIN_SEEDS` seed pairs
went into it (with fewer seeds the seed level of the bootstrap is degenerate: one seed has no
spread at all); otherwise its verdict is "cannot be told apart".

Metrics: ``"mean"`` of per-item values (0/1 hits for R@K, 0/1 correctness for accuracy) and
``"macro_auroc"`` of per-item class scores (one-vs-rest, as ``metrics.macro_auroc``; each
resample weighs the pairs of the full set by the items' counts, ``metrics.macro_auroc_resampled``).
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import torch

from .metrics import bootstrap_indices, macro_auroc, macro_auroc_resampled, percentile_interval

#: the fewest seed pairs a verdict other than "cannot be told apart" needs
MIN_SEEDS = 3
HELPS, HURTS, TIED = "helps", "hurts", "cannot be told apart"
ONE_SEED = "one seed: cannot be told apart"
METRIC_KINDS = ("mean", "macro_auroc")

RESAMPLING = ("two-level paired bootstrap: each resample draws the test items with replacement "
              "(shared by every seed and both models) and the seed pairs with replacement; the "
              "difference is the mean over the drawn seed pairs of A - B on the drawn items; "
              f"95 % percentile interval; a verdict needs >= {MIN_SEEDS} seed pairs")


def seed_verdict(ci: Sequence[float], n_seeds: int) -> str:
    """``helps`` / ``hurts`` when the interval excludes 0 and ``n_seeds >= MIN_SEEDS``, else
    "cannot be told apart" (said as "one seed: ..." for one seed, "N seeds: ..." below the
    minimum)."""
    if n_seeds <= 1:
        return ONE_SEED
    if n_seeds < MIN_SEEDS:
        return f"{n_seeds} seeds: {TIED} (a verdict needs >= {MIN_SEEDS})"
    lo, hi = ci
    if lo != lo or hi != hi:
        return TIED
    if lo > 0:
        return HELPS
    if hi < 0:
        return HURTS
    return TIED


def metric_value(kind: str, values: torch.Tensor, y: torch.Tensor | None = None) -> float:
    """The metric on the full item set: ``values`` [n] (mean) or scores [n, C] with ``y`` [n]."""
    if kind == "mean":
        return float(values.double().mean())
    if kind == "macro_auroc":
        return macro_auroc(y, values)[0]
    raise ValueError(f"metric kind must be one of {METRIC_KINDS}, got {kind!r}")


def metric_resampled(kind: str, values: torch.Tensor, idx: torch.Tensor,
                     y: torch.Tensor | None = None) -> torch.Tensor:
    """The metric on every item resample ``idx`` [n_boot, n] -> float64 [n_boot]."""
    if kind == "mean":
        return values.double()[idx].mean(dim=1)
    if kind == "macro_auroc":
        return macro_auroc_resampled(y, values, idx)
    raise ValueError(f"metric kind must be one of {METRIC_KINDS}, got {kind!r}")


def _sd(xs: list[float]) -> float:
    ok = [x for x in xs if x == x]
    return statistics.stdev(ok) if len(ok) > 1 else float("nan")


def _mean(xs: list[float]) -> float:
    ok = [x for x in xs if x == x]
    return statistics.fmean(ok) if ok else float("nan")


def paired_seed_difference(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], kind: str = "mean",
                           y: torch.Tensor | None = None, *, n_boot: int = 2000,
                           seed: int = 0, level: float = 0.95) -> dict:
    """A - B over paired training seeds (see the module docstring).

    ``a``, ``b``: one entry per seed (same length, seed ``k`` paired with seed ``k``), each the
    per-item values of one trained model on the same items: float [n] for ``kind="mean"``,
    scores [n, C] for ``"macro_auroc"`` (with the targets ``y`` int64 [n]).
    Returns ``{"a": {"mean", "sd", "per_seed"}, "b": {...}, "diff", "diff_sd", "per_seed_diff",
    "ci95", "verdict", "n_seeds", "n_items", "resampling"}`` (metric values as fractions).
    """
    if len(a) != len(b) or not a:
        raise ValueError(f"paired seeds: got {len(a)} runs of A and {len(b)} of B (need equal, >= 1)")
    n = int(a[0].shape[0])
    for t in list(a) + list(b):
        if int(t.shape[0]) != n:
            raise ValueError(f"paired seeds: every run must score the same {n} items, got "
                             f"{int(t.shape[0])}")
    if n < 1:
        raise ValueError("paired seeds: no items")
    va = [metric_value(kind, t, y) for t in a]
    vb = [metric_value(kind, t, y) for t in b]
    per_seed = [x - z for x, z in zip(va, vb)]
    s = len(a)
    idx = bootstrap_indices(n, n_boot, seed)
    # D[k, r]: seed pair k's difference on item resample r (the same items for A and B)
    d = torch.stack([metric_resampled(kind, ta, idx, y) - metric_resampled(kind, tb, idx, y)
                     for ta, tb in zip(a, b)])
    g = torch.Generator().manual_seed(int(seed) + 1)
    sidx = torch.randint(0, s, (n_boot, s), generator=g)  # seed pairs drawn per resample
    boot = d.T.gather(1, sidx).nanmean(1)  # [n_boot]: mean over the drawn pairs
    ci = percentile_interval(boot, level)
    return {"a": {"mean": _mean(va), "sd": _sd(va), "per_seed": va},
            "b": {"mean": _mean(vb), "sd": _sd(vb), "per_seed": vb},
            "diff": _mean(per_seed), "diff_sd": _sd(per_seed), "per_seed_diff": per_seed,
            "ci95": ci, "verdict": seed_verdict(ci, s), "n_seeds": s, "n_items": n,
            "n_boot": n_boot, "resampling": RESAMPLING}


def format_interval(d: dict, scale: float = 100.0) -> str:
    """``"+1.2 (95 % -0.4 to +2.9)"`` in points."""
    lo, hi = d["ci95"]
    if not (math.isfinite(d["diff"]) and math.isfinite(lo) and math.isfinite(hi)):
        return "-"
    return f"{scale * d['diff']:+.1f} ({scale * lo:+.1f} to {scale * hi:+.1f})"


def format_mean_sd(x: dict, scale: float = 100.0) -> str:
    """``"61.2 ± 3.4"`` (``± sd`` only with >= 2 seeds)."""
    m, sd = x["mean"], x["sd"]
    if m != m:
        return "-"
    return f"{scale * m:.1f} ± {scale * sd:.1f}" if sd == sd else f"{scale * m:.1f}"


__all__ = ["MIN_SEEDS", "HELPS", "HURTS", "TIED", "ONE_SEED", "RESAMPLING", "seed_verdict",
           "metric_value", "metric_resampled", "paired_seed_difference", "format_interval",
           "format_mean_sd"]
