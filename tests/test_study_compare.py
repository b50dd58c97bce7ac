"""``regionmed_fast.eval.compare``: the two-level paired bootstrap over training seeds and test
items, and verdicts that come from the interval and the number of seeds, never from one seed."""
from __future__ import annotations

import pytest
import torch

from regionmed_fast.eval import compare as C
from regionmed_fast.eval.metrics import macro_auroc


def _hits(p: float, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, generator=g) < p).double()


def test_clear_gain_over_five_seeds_helps_and_loss_hurts():
    base = [_hits(0.3, 200, s) for s in range(5)]
    better = [torch.maximum(b, _hits(0.5, 200, 100 + s)) for s, b in enumerate(base)]
    d = C.paired_seed_difference(better, base, n_boot=500)
    assert d["verdict"] == C.HELPS and d["ci95"][0] > 0 and d["n_seeds"] == 5
    assert d["diff"] == pytest.approx(sum(d["per_seed_diff"]) / 5)
    assert d["a"]["per_seed"] == [float(t.mean()) for t in better]
    assert C.paired_seed_difference(base, better, n_boot=500)["verdict"] == C.HURTS


def test_identical_models_cannot_be_told_apart():
    runs = [_hits(0.4, 100, s) for s in range(5)]
    d = C.paired_seed_difference(runs, [t.clone() for t in runs], n_boot=300)
    assert d["diff"] == 0 and d["ci95"] == [0.0, 0.0] and d["verdict"] == C.TIED


def test_one_or_two_seeds_never_give_a_verdict():
    base = [_hits(0.2, 300, s) for s in range(2)]
    better = [torch.ones(300, dtype=torch.float64)] * 2  # +80 points on every item
    d1 = C.paired_seed_difference(better[:1], base[:1], n_boot=200)
    assert d1["ci95"][0] > 0.5 and d1["verdict"] == C.ONE_SEED
    d2 = C.paired_seed_difference(better, base, n_boot=200)
    assert d2["verdict"].startswith("2 seeds: cannot be told apart")


def test_seed_spread_widens_the_interval():
    """Per seed the gain is large on the items, but its sign flips between seeds: the item-level
    interval of each seed excludes 0, the two-level interval over seeds must not."""
    n, seeds = 400, 5
    base = [_hits(0.5, n, s) for s in range(seeds)]
    signs = [1, -1, 1, -1, 1]
    a = [torch.clamp(b + s * _hits(0.5, n, 50 + k), 0, 1) for k, (b, s) in enumerate(zip(base, signs))]
    for ta, tb in zip(a, base):
        one = C.paired_seed_difference([ta], [tb], n_boot=300)
        assert one["ci95"][0] > 0 or one["ci95"][1] < 0  # each seed alone: far from 0
    d = C.paired_seed_difference(a, base, n_boot=1000)
    assert d["ci95"][0] < 0 < d["ci95"][1] and d["verdict"] == C.TIED
    assert d["diff_sd"] > 0.2


def test_macro_auroc_kind_and_item_pairing():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(60) % 3
    good = [torch.nn.functional.one_hot(y, 3).double() + 0.8 * torch.rand(60, 3, generator=g)
            for _ in range(4)]
    noise = [torch.rand(60, 3, generator=g).double() for _ in range(4)]
    d = C.paired_seed_difference(good, noise, "macro_auroc", y, n_boot=300)
    assert d["a"]["per_seed"] == [macro_auroc(y, t)[0] for t in good]
    assert d["verdict"] == C.HELPS
    # both models are scored on the same drawn items in each resample: a shifted copy (same
    # ranking, same AUROC) differs by exactly 0 on every resample
    same = C.paired_seed_difference(good, [t + 1.0 for t in good], "macro_auroc", y, n_boot=100)
    assert same["ci95"] == [0.0, 0.0]


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="paired seeds"):
        C.paired_seed_difference([torch.ones(3)], [torch.ones(3)] * 2)
    with pytest.raises(ValueError, match="same 3 items"):
        C.paired_seed_difference([torch.ones(3)], [torch.ones(4)])
    with pytest.raises(ValueError, match="metric kind"):
        C.paired_seed_difference([torch.ones(3)], [torch.ones(3)], kind="median")


def test_seed_verdict_table():
    assert C.seed_verdict([0.01, 0.2], 5) == C.HELPS
    assert C.seed_verdict([-0.2, -0.01], 3) == C.HURTS
    assert C.seed_verdict([-0.2, 0.01], 5) == C.TIED
    assert C.seed_verdict([0.01, 0.2], 1) == C.ONE_SEED
    assert C.seed_verdict([float("nan"), 0.2], 5) == C.TIED
    assert C.format_interval({"diff": 0.012, "ci95": [-0.004, 0.029]}) == "+1.2 (-0.4 to +2.9)"
