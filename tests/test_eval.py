"""Evaluation: metrics against hand-computed cases, chunked == dense, task runners on a
constructed model and a tiny dataset, and the report folder."""
from __future__ import annotations

import math

import pytest
import torch

from regionmed_fast.eval import metrics as M


# ----------------------------------------------------------------------------- metrics

def test_dedup_texts_whitespace_and_order():
    uniq, idx = M.dedup_texts(["a b", "c", "a  b ", "c", "d"])
    assert uniq == ["a b", "c", "d"]
    assert idx.tolist() == [0, 1, 0, 1, 2]
    with pytest.raises(TypeError):
        M.dedup_texts(["a", None])


def test_ranks_hand_computed():
    # 3 queries, 4 keys, 1-D embeddings so scores are easy to read: s_ij = q_i * k_j
    q = torch.tensor([[1.0], [2.0], [-1.0]])
    k = torch.tensor([[3.0], [1.0], [2.0], [-1.0]])
    # q0 scores [3,1,2,-1], target key 2 (score 2): key 0 ahead -> rank 2
    # q1 scores [6,2,4,-2], target key 0 -> rank 1
    # q2 scores [-3,-1,-2,1], target key 1 (-1): key 3 ahead -> rank 2
    ranks = M.retrieval_ranks(q, k, torch.tensor([2, 0, 1]), torch.tensor([0, 1, 2, 3]))
    assert ranks.tolist() == [2, 1, 2]
    assert M.recall_at_k(ranks, 1) == pytest.approx(1 / 3)
    assert M.recall_at_k(ranks, 2) == 1.0
    assert M.median_rank(ranks) == 2.0
    assert M.median_rank(torch.tensor([1, 4])) == 2.5


def test_ranks_ties_count_against_model():
    # every score equal (collapsed model): rank = number of keys, not 1
    q = torch.ones(3, 2)
    k = torch.ones(5, 2)
    ranks = M.retrieval_ranks(q, k, torch.tensor([0, 1, 2]), torch.arange(5))
    assert ranks.tolist() == [5, 5, 5]
    # partial tie: target ties with one non-target and beats the rest -> rank 2
    q = torch.tensor([[1.0]])
    k = torch.tensor([[0.5], [1.0], [1.0], [0.2]])
    assert M.retrieval_ranks(q, k, torch.tensor([1]), torch.arange(4)).tolist() == [2]


def test_ranks_duplicate_texts_form_one_target_set():
    # images 0 and 1 share one note: text->image query of that note has both as targets
    texts = ["note A", "note A", "note B"]
    uniq, tid = M.dedup_texts(texts)
    img = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    txt = torch.tensor([[0.8, 0.2], [0.0, 1.0]])  # embeddings of the 2 unique texts
    # t2i: note A scores images [0.8, 0.74, 0.2]; best target = 0.8 -> rank 1 (image 1, another
    # correct target, is not counted as a miss)
    r = M.retrieval_ranks(txt, img, torch.arange(len(uniq)), tid)
    assert r.tolist() == [1, 1]
    # i2t over unique texts: image 1 -> note A (0.74) vs note B (0.1): rank 1
    r = M.retrieval_ranks(img, txt, tid, torch.arange(len(uniq)))
    assert r.tolist() == [1, 1, 1]
    # without dedup (3 keys), image 0's duplicate would rank as a wrong answer: scores for
    # image 1 against [A, A, B] with target only key 1 -> key 0 (same score) counts against
    r = M.retrieval_ranks(img, txt[tid], torch.arange(3), torch.arange(3))
    assert r.tolist()[1] == 2


def test_ranks_missing_target_is_error():
    with pytest.raises(ValueError, match="no target"):
        M.retrieval_ranks(torch.ones(2, 2), torch.ones(2, 2), torch.tensor([0, 5]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="widths"):
        M.retrieval_ranks(torch.ones(2, 2), torch.ones(2, 3), torch.tensor([0, 1]), torch.tensor([0, 1]))


def _dense_ranks(q, k, qg, kg):
    s = q @ k.T
    tgt = qg[:, None] == kg[None, :]
    best = s.masked_fill(~tgt, -math.inf).amax(1)
    return ((s >= best[:, None]) & ~tgt).sum(1) + 1


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, None])
def test_chunked_equals_dense(chunk):
    g = torch.Generator().manual_seed(1)
    # small integer embeddings: exact float arithmetic whatever the tiling, and many ties
    q = torch.randint(-2, 3, (23, 4), generator=g).float()
    k = torch.randint(-2, 3, (17, 4), generator=g).float()
    kg = torch.randint(0, 9, (17,), generator=g)
    qg = kg[torch.randint(0, 17, (23,), generator=g)]
    assert torch.equal(M.retrieval_ranks(q, k, qg, kg, chunk_size=chunk), _dense_ranks(q, k, qg, kg))
    s, i = M.topk_chunked(q, k, 5, chunk_size=chunk)
    dense = q @ k.T
    order = torch.sort(dense, dim=1, descending=True, stable=True).indices[:, :5]
    assert torch.equal(i, order)
    assert torch.equal(s, torch.gather(dense, 1, order))
    # random real-valued normalised embeddings: same indices, scores within rounding
    qf = torch.nn.functional.normalize(torch.randn(31, 16, generator=g), dim=1)
    kf = torch.nn.functional.normalize(torch.randn(29, 16, generator=g), dim=1)
    s, i = M.topk_chunked(qf, kf, 4, chunk_size=chunk)
    d = torch.topk(qf @ kf.T, 4, dim=1)
    assert torch.equal(i, d.indices)
    torch.testing.assert_close(s, d.values)


def test_topk_k_larger_than_keys():
    s, i = M.topk_chunked(torch.ones(2, 3), torch.ones(3, 3), 10, chunk_size=2)
    assert i.tolist() == [[0, 1, 2], [0, 1, 2]]


def test_classification_metrics_hand_computed():
    t = [0, 0, 0, 1, 1, 2]
    p = [0, 0, 1, 1, 0, 2]
    cm = M.confusion_matrix(torch.tensor(t), torch.tensor(p), 3)
    assert cm.tolist() == [[2, 1, 0], [1, 1, 0], [0, 0, 1]]
    assert M.accuracy(torch.tensor(t), torch.tensor(p)) == pytest.approx(4 / 6)
    assert M.balanced_accuracy(torch.tensor(t), torch.tensor(p), 3) == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    # class 3 absent from y_true: not in the mean
    assert M.balanced_accuracy(torch.tensor([0, 1]), torch.tensor([0, 3]), 4) == pytest.approx(0.5)


def test_binary_auroc_hand_computed_with_ties():
    # pos scores [0.8, 0.5], neg [0.5, 0.2]: pairs (0.8>0.5)=1, (0.8>0.2)=1, (0.5=0.5)=0.5, (0.5>0.2)=1
    y = torch.tensor([1, 1, 0, 0])
    s = torch.tensor([0.8, 0.5, 0.5, 0.2])
    assert M.binary_auroc(y, s) == pytest.approx(3.5 / 4)
    assert M.binary_auroc(torch.tensor([1, 0]), torch.tensor([0.3, 0.3])) == 0.5
    assert math.isnan(M.binary_auroc(torch.tensor([1, 1]), torch.tensor([0.1, 0.2])))


def test_macro_auroc_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (60,), generator=g)
    sc = torch.randint(0, 5, (60, 4), generator=g).double()  # coarse scores: many ties
    macro, per = M.macro_auroc(y, sc)
    for c in range(4):
        assert per[c] == pytest.approx(metrics.roc_auc_score((y == c).numpy(), sc[:, c].numpy()))
    assert macro == pytest.approx(sum(per) / 4)
    assert M.balanced_accuracy(y, sc.argmax(1), 4) == pytest.approx(
        metrics.balanced_accuracy_score(y.numpy(), sc.argmax(1).numpy()))
