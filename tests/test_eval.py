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
    nan = torch.ones(2, 2)
    nan[1, 0] = float("nan")
    with pytest.raises(ValueError, match="query row 1"):
        M.retrieval_ranks(nan, torch.ones(2, 2), torch.tensor([0, 1]), torch.tensor([0, 1]))
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


def test_bootstrap_intervals_and_verdicts():
    x = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    idx = M.bootstrap_indices(8, 500, seed=3)
    assert torch.equal(idx, M.bootstrap_indices(8, 500, seed=3))  # seeded: same in every process
    lo, hi = M.mean_interval(x, idx)
    assert lo < 0.75 < hi
    # a row against itself: difference 0, interval [0, 0], never a finding
    same = M.mean_difference(x, x, idx)
    assert same == {"diff": 0.0, "ci95": [0.0, 0.0], "verdict": "cannot be told apart"}
    # always right vs always wrong: the interval excludes 0
    d = M.mean_difference(torch.ones(8), torch.zeros(8), idx)
    assert d["diff"] == 1.0 and d["verdict"] == "higher"
    assert M.verdict([-0.2, -0.01]) == "lower" and M.verdict([-0.2, 0.1]) == "cannot be told apart"
    assert M.verdict([float("nan"), 0.3]) == "cannot be told apart"


def test_macro_auroc_resampled_equals_one_resample_at_a_time():
    g = torch.Generator().manual_seed(5)
    y = torch.randint(0, 4, (40,), generator=g)
    sc = torch.randint(0, 6, (40, 4), generator=g).double()  # coarse: many ties
    idx = M.bootstrap_indices(40, 60, seed=1)
    fast = M.macro_auroc_resampled(y, sc, idx, block=7)  # several blocks of negatives
    slow = torch.tensor([M.macro_auroc(y[r], sc[r])[0] for r in idx], dtype=torch.float64)
    torch.testing.assert_close(fast, slow)
    full = M.macro_auroc_resampled(y, sc, torch.arange(40)[None])
    assert full.item() == pytest.approx(M.macro_auroc(y, sc)[0])


# ----------------------------------------------------------------------------- task runners
# A hand-built model whose embeddings are exact by construction: a text embeds as the sum of
# one-hots of the colour words it contains; an image embeds as the histogram of its pixels'
# nearest colours. Its region-aware embedding is the histogram of its boxes' pixels only, so it
# DIFFERS from the global one (the spots, not the background); its proposer marks the cells
# unlike the background. A tiny colour dataset: background colour = class label, two spots with
# phrases naming them; every sixth image is a plain red image without boxes.

import json  # noqa: E402
import os  # noqa: E402
import pathlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from typing import NamedTuple  # noqa: E402

import numpy as np  # noqa: E402

from regionmed_fast.data.manifest import read_manifest  # noqa: E402
from regionmed_fast.data.split import select_split  # noqa: E402
from regionmed_fast.data.transforms import denormalize  # noqa: E402
from regionmed_fast.eval import embed as E  # noqa: E402
from regionmed_fast.model import ProposerConfig, boxes_to_rois, propose_from_saliency  # noqa: E402

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220),
           "yellow": (230, 220, 30), "cyan": (30, 220, 220), "magenta": (220, 30, 220)}
NAMES = list(COLOURS)


class FakeTokenizer:
    def __init__(self):
        self.table: list[str] = []

    def __call__(self, texts):
        ids = []
        for t in texts:
            if t not in self.table:
                self.table.append(t)
            ids.append(self.table.index(t))
        ids = torch.tensor(ids, dtype=torch.long)[:, None]
        return ids, torch.ones_like(ids)


class FakeFeats(NamedTuple):
    oh: torch.Tensor  # [B, 6, H, W] nearest-colour one-hot
    image_hw: tuple


class FakeModel(torch.nn.Module):
    """Perfect-by-construction embeddings (see above); D = 6 colours + 1 bias dim."""

    def __init__(self, tok: FakeTokenizer, region_aware: bool = True, patch: int = 4):
        super().__init__()
        self.tok, self.patch = tok, patch
        self.roi = torch.nn.Identity() if region_aware else None
        self.w = torch.nn.Parameter(torch.zeros(1))  # so the model has a device
        self.register_buffer("pal", torch.tensor([COLOURS[n] for n in NAMES], dtype=torch.float32) / 255)

    def encode_text(self, ids, mask=None, normalize=True):
        e = torch.tensor([[float(n in self.tok.table[i].lower()) for n in NAMES] + [0.01]
                          for i in ids[:, 0].tolist()])
        return torch.nn.functional.normalize(e, dim=-1) if normalize else e

    @staticmethod
    def _emb(hist):
        return torch.nn.functional.normalize(torch.cat([hist, torch.full_like(hist[..., :1], 1e-3)], -1), dim=-1)

    def image_features(self, images):
        x = (denormalize(images) / 255).permute(0, 2, 3, 1)
        d = ((x[..., None, :] - self.pal) ** 2).sum(-1)
        oh = torch.nn.functional.one_hot(d.argmin(-1), len(NAMES)).permute(0, 3, 1, 2).float()
        return FakeFeats(oh, tuple(images.shape[-2:]))

    def _f(self, x):
        return x if isinstance(x, FakeFeats) else self.image_features(x)

    def encode_image(self, x, boxes=None, normalize=True, *, box_counts=None, proposer=None):
        f = self._f(x)
        if boxes is None or self.roi is None:
            return self._emb(f.oh.mean((2, 3)))
        return self.encode_regions(f, boxes, box_counts=box_counts, proposer=proposer)[1]

    def propose_boxes(self, x, **kw):
        f = self._f(x)
        background = f.oh.mean((2, 3)).argmax(1)
        bg = f.oh[torch.arange(len(background)), background]  # [B, H, W]
        sal = 1 - torch.nn.functional.avg_pool2d(bg[:, None], self.patch)[:, 0]
        return propose_from_saliency(sal, f.image_hw, ProposerConfig(**kw), patch_size=self.patch)

    def encode_regions(self, x, boxes, normalize=True, *, box_counts=None, proposer=None):
        f = self._f(x)
        if isinstance(boxes, str):
            boxes, box_counts = self.propose_boxes(f, **(proposer or {}))
        B = f.oh.shape[0]
        rois = boxes_to_rois(boxes, B, box_counts)
        hists = [f.oh[int(b), :, int(y1):max(int(y2), int(y1) + 1), int(x1):max(int(x2), int(x1) + 1)].mean((1, 2))
                 for b, x1, y1, x2, y2 in rois.tolist()]
        rb = rois[:, 0].long()
        glob = f.oh.mean((2, 3))
        fused = torch.stack([torch.stack([h for h, j in zip(hists, rb.tolist()) if j == i]).mean(0)
                             if (rb == i).any() else glob[i] for i in range(B)])
        region = self._emb(torch.stack(hists)) if hists else torch.zeros(0, 7)
        return self._emb(glob), self._emb(fused), region, rb

    def patch_embeddings(self, x):
        oh = torch.nn.functional.avg_pool2d(self._f(x).oh, self.patch)
        return self._emb(oh.permute(0, 2, 3, 1))


def _colour_dataset(root, n=18, size=32, seed=0, with_split=True):
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    lines = []
    for i in range(n):
        cls = ["red", "green", "blue"][i % 3]
        img = np.zeros((size, size, 3), np.uint8) + np.array(COLOURS[cls], np.uint8)
        spots = rng.choice(["yellow", "cyan", "magenta"], size=2, replace=False)
        regions = []
        if i % 6:
            for j, sp in enumerate(spots):
                x0 = 2 + 16 * j + int(rng.integers(0, 4))
                y0 = int(rng.integers(2, 18))
                img[y0:y0 + 10, x0:x0 + 10] = COLOURS[sp]
                regions.append({"bbox": [x0, y0, x0 + 10, y0 + 10], "text": f"a {sp} spot",
                                "label": sp, "kind": sp, "location": "left" if j == 0 else "right"})
        name = f"images/{i:03d}.png"
        Image.fromarray(img).save(root / name)
        # two images per text: duplicates exercise the dedup rule
        rec = {"image": name, "width": size, "height": size,
               "text": f"a {cls} image with a {spots[0]} spot and a {spots[1]} spot"
               if i % 2 and regions else f"a {cls} image",
               "regions": regions, "labels": [cls], "patient_id": f"p{i // 2}"}
        if with_split:
            rec["split"] = "test" if i % 3 == i % 2 else "train"
        lines.append(rec)
    (root / "annotations.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    return root


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory):
    return _colour_dataset(tmp_path_factory.mktemp("colour"))


@pytest.fixture(scope="module")
def colour_set(colour_data):
    tok = FakeTokenizer()
    model = FakeModel(tok)
    return tok, model, E.embed_split(model, read_manifest(str(colour_data)), image_size=32, batch_size=5)


def test_embed_split_rows(colour_set):
    _, model, es = colour_set
    assert es.n_images == 18 and sum(es.has_boxes) == 15
    assert set(es.rows()) == {"global", "proposed_boxes"}
    assert set(es.rows(oracle=True)) == {"global", "proposed_boxes", "oracle_boxes"}
    # every image gets the same number of proposed boxes, plain or spotted
    assert [b.shape[0] for b in es.proposed.boxes] == [3] * 18
    # the region-aware rows are not the global one on spotted images (the spots only)
    spotted = torch.tensor(es.has_boxes)
    assert not torch.allclose(es.oracle.fused[spotted], es.image_global[spotted])
    assert not torch.allclose(es.proposed.fused[spotted], es.image_global[spotted])
    # oracle boxes are the annotated ones (in the 32 px input, unchanged), with their phrases
    assert es.oracle.boxes[1].tolist() == es.boxes[1].tolist() and es.boxes[1].shape == (2, 4)
    assert len(es.region_texts) == es.oracle.region.shape[0] == 30
    sub = es.subset([1, 2, 4])
    assert sub.n_images == 3 and sub.region_image.tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.equal(sub.oracle.region, es.oracle.region[[0, 1, 2, 3, 6, 7]])
    assert torch.equal(sub.oracle.fused, es.oracle.fused[[1, 2, 4]])


def test_zeroshot_rows_use_their_own_embeddings(colour_set):
    from regionmed_fast.eval.zeroshot import evaluate_zeroshot

    tok, model, es = colour_set
    res = evaluate_zeroshot(es, model, tok, es.rows(oracle=True), n_boot=200)
    assert res["classes"] == ["blue", "green", "red"]
    g = res["by_embedding"]["global"]
    assert g["accuracy"] == 1.0 and g["balanced_accuracy"] == 1.0 and g["macro_auroc"] == 1.0
    assert g["confusion_matrix"] == [[6, 0, 0], [0, 6, 0], [0, 0, 6]]
    assert g["accuracy_ci95"] == [1.0, 1.0]
    # oracle boxes cover the spots only: no class colour is left, every class scores the same,
    # the tie goes to class 0 (blue) and AUROC is 1/2; plain images keep their global embedding
    o = res["by_embedding"]["oracle_boxes"]
    plain = [not h for h in es.has_boxes]
    want = sum(p or lab == ["blue"] for p, lab in zip(plain, es.labels)) / 18
    assert o["accuracy"] == pytest.approx(want) and o["accuracy"] < 1.0
    # the proposed row is scored on the proposed-box embedding itself
    cls = torch.stack([torch.nn.functional.normalize(torch.tensor(
        [float(n == c) for n in NAMES] + [0.01]), dim=0) for c in res["classes"]])
    y = torch.tensor([res["classes"].index(lab[0]) for lab in es.labels])
    pred = (es.proposed.fused @ cls.T).argmax(1)
    assert res["by_embedding"]["proposed_boxes"]["accuracy"] == pytest.approx(float((pred == y).double().mean()))
    # prompt sets: three of them, each scored alone; the spread is reported
    assert len(g["per_prompt_set"]) == 3 and g["prompt_spread"]["accuracy"]["min"] == 1.0
    diffs = {(d["metric"], d["a"]): d for d in res["differences"]}
    assert diffs[("accuracy", "oracle_boxes")]["diff"] == pytest.approx(want - 1.0)
    assert diffs[("accuracy", "oracle_boxes")]["verdict"] == "lower"
    assert res["majority_baseline"] == {"accuracy": pytest.approx(1 / 3), "balanced_accuracy": pytest.approx(1 / 3)}


def test_grounding(colour_set):
    from regionmed_fast.eval.grounding import evaluate_grounding

    tok, model, es = colour_set
    res = evaluate_grounding(es, model, tok, batch_size=3)
    assert res["pointing_game"]["hit_rate"] == 1.0 and res["pointing_game"]["n_queries"] == 30
    assert "box_choice" not in res  # the annotated boxes are given only in the oracle section
    pc = res["proposed_box_choice"]
    # the proposer marks the spots: every spot is found by a proposed box, and the phrase
    # picks a proposed box on its spot
    assert pc["proposal_hit_rate"] == 1.0 and pc["accuracy"] == 1.0 and pc["n_queries"] == 30
    assert 0 < pc["chance"] < 1 and pc["proposal_hit_rate_shuffled"] < 1
    o = evaluate_grounding(es, model, tok, oracle=True)["box_choice"]
    assert o == {"accuracy": 1.0, "chance": 0.5, "n_queries": 30}
    # a model blind to the box content chooses no better than a tie -> counted wrong
    blind = E.EvalSet(**{**es.__dict__, "oracle": E.RegionRows(
        es.oracle.fused, es.oracle.boxes, torch.ones_like(es.oracle.region), es.oracle.region_image)})
    assert evaluate_grounding(blind, model, tok, oracle=True)["box_choice"]["accuracy"] == 0.0


def test_retrieval_rows_and_global_only(colour_data, colour_set):
    from regionmed_fast.eval.retrieval import evaluate_retrieval

    tok, model, es = colour_set
    res = evaluate_retrieval(es, model, tok, es.rows(), chunk_size=5, n_boot=200)
    assert res["n_unique_texts"] < res["n_images"]  # "a red image" etc. shared
    assert set(res["image_to_text"]) == {"global", "proposed_boxes"}
    assert "region_to_text" not in res  # an oracle-box task: only in the oracle section
    d = [x for x in res["differences"] if x["metric"] == "image_to_text R@1"][0]
    gi, pi = (res["image_to_text"][r]["R@1"] for r in ("global", "proposed_boxes"))
    assert d["diff"] == pytest.approx(pi - gi) and gi != pi
    s = res["image_to_text"]["global"]
    # the interval is the percentile bootstrap of the per-image hits over seeded image draws
    # (recomputed here from the ranks), a real interval where 0 < R@1 < 1
    ranks = evaluate_retrieval(es, model, tok, es.rows(), chunk_size=5, n_boot=200,
                               keep_items=True)["items"]["image_to_text"]["global"]
    hits = (ranks <= 1).double()
    assert s["R@1"] == pytest.approx(float(hits.mean())) and 0 < s["R@1"] < 1
    want = M.percentile_interval(hits[M.bootstrap_indices(len(hits), 200, 0)].mean(1))
    assert s["R@1_ci95"] == pytest.approx(want) and s["R@1_ci95"][0] < s["R@1_ci95"][1]
    res = evaluate_retrieval(es, model, tok, es.rows(oracle=True), region_rows=True)
    assert res["region_to_text"]["R@1"] == 1.0
    flat = FakeModel(tok, region_aware=False)
    es0 = E.embed_split(flat, read_manifest(str(colour_data)), image_size=32, batch_size=7)
    assert es0.proposed is None and es0.oracle is None and list(es0.rows(oracle=True)) == ["global"]
    res = evaluate_retrieval(es0, flat, tok, es0.rows())
    assert set(res["image_to_text"]) == {"global"} and "differences" not in res


def test_generate_qa_fields():
    from regionmed_fast.eval.vqa import generate_qa

    recs = [{"image": "a.png", "labels": ["mass"], "regions": [
        {"bbox": [0, 0, 1, 1], "kind": "mass", "location": "right upper zone", "size_mm": 30.0}]},
        {"image": "b.png", "labels": ["nodule"], "view": "PA", "regions": [
            {"bbox": [0, 0, 1, 1], "kind": "nodule", "location": "left lower zone", "size_mm": 6.0}]}]
    qa = {(q["image"], q["question"]): q["answer"] for q in generate_qa(recs)}
    assert qa[("a.png", "is there mass in this image?")] == "yes"
    assert qa[("a.png", "is there nodule in this image?")] == "no"
    assert qa[("a.png", "what kind of finding is in the right upper zone?")] == "mass"
    assert qa[("b.png", "where is the nodule?")] == "left lower zone"
    assert qa[("a.png", "is the mass in the right upper zone larger than 30 mm?")] == "no"
    assert qa[("b.png", "which view is this image?")] == "pa"
    assert qa[("b.png", "how many annotated regions are there?")] == "1"


def _strip_timing(res):
    return {k: v for k, v in res.items() if k != "timing_s"}


def test_evaluate_end_to_end_report_and_determinism(colour_data, tmp_path):
    from regionmed_fast.eval.runner import evaluate

    tok = FakeTokenizer()
    model = FakeModel(tok).train()
    out = tmp_path / "report"
    res = evaluate(model, colour_data, report_dir=out, split="test", tokenizer=tok, image_size=32,
                   batch_size=4, n_boot=200)
    assert model.training  # evaluation ran in eval mode and gave the mode back
    assert res["n_images"] == 6 and res["rows"] == ["global", "proposed_boxes"]
    v = res["vqa"]
    assert v["qa_source"].startswith("generated") and v["n_closed"] > 0 and v["n_open"] > 0
    assert set(v["by_embedding"]) == {"global", "proposed_boxes"}
    assert "blank_image_control" in v["by_embedding"]["global"] and "not run" in v["oracle_boxes"]
    o = res["oracle"]
    assert o["rows"] == ["global", "proposed_boxes", "oracle_boxes"]
    assert o["n_images"] == sum(bool(r["regions"]) for r in select_split(read_manifest(str(colour_data)), "test"))
    assert o["grounding"]["box_choice"]["accuracy"] == 1.0 and "region_to_text" in o["retrieval"]
    files = res["report_files"]
    assert {"recall_at_k.png", "zeroshot_confusion.png", "retrieval_grid.png", "grounding_examples.png",
            "results.json", "timing.json", "report.md"} <= set(files)
    for f in files:
        assert (out / f).stat().st_size > 0, f
    assert sorted(p.name for p in out.iterdir()) == sorted(files)
    saved = json.loads((out / "results.json").read_text())
    assert saved["report_files"] == files and "timing_s" not in saved
    md = (out / "report.md").read_text()
    assert "generated from annotations" in md and "| region to text |" in md
    assert md.index("## Oracle boxes (apart from the headline)") > md.index("## VQA")
    assert "blank image" in md and any(w in md for w in ("cannot be told apart", "higher", "lower"))
    # the same model, data and seed give the same numbers, whatever ran before in the process
    torch.manual_seed(1234)
    torch.rand(100)
    again = evaluate(model, colour_data, split="test", tokenizer=tok, image_size=32, batch_size=3,
                     n_boot=200)
    assert json.dumps(_strip_timing(again), sort_keys=True, default=str) == json.dumps(
        {k: v for k, v in _strip_timing(res).items() if k != "report_files"}, sort_keys=True, default=str)


def test_synthetic_end_to_end_vqa_with_qa_file(tmp_path):
    synthetic = pytest.importorskip("regionmed_fast.data.synthetic")
    from regionmed_fast.eval.runner import evaluate

    synthetic.write_dataset(tmp_path / "syn", n=24, size=32, seed=0, split_fraction=0.4)
    tok = FakeTokenizer()
    res = evaluate(FakeModel(tok), tmp_path / "syn", tasks="zeroshot,grounding,vqa", tokenizer=tok,
                   image_size=32, n_boot=100, items=True)
    assert "multilabel_macro_auroc" in res["zeroshot"]["by_embedding"]["global"]
    v = res["vqa"]
    assert v["qa_source"] == "qa.jsonl" and v["n_test"] > 0
    for row in ("global", "proposed_boxes"):
        r = v["by_embedding"][row]
        lo, hi = r["accuracy_ci95"]
        if 0 < r["accuracy"] < 1:  # the items disagree: the resamples must too
            assert lo < hi
        # the interval is the bootstrap of this row's per-question correctness
        correct = res["items"]["vqa"]["correct"][row]
        assert r["accuracy"] == pytest.approx(float(correct.mean()))
        assert [lo, hi] == pytest.approx(
            M.mean_interval(correct, M.bootstrap_indices(v["n_test"], 100, 0)))
        assert r["minus_blank"]["diff"] == pytest.approx(
            r["accuracy"] - r["blank_image_control"]["accuracy"])
    assert res["grounding"]["pointing_game"]["n_queries"] > 0
    with pytest.raises(ValueError, match="tasks"):
        evaluate(FakeModel(tok), tmp_path / "syn", tasks="retrieval,bogus", tokenizer=tok, image_size=32)


def test_split_rule_is_the_data_layers(tmp_path):
    # a manifest without split: eval --split test scores exactly data.split's test records,
    # none of which is in its train split; with a group key no patient straddles the two
    from regionmed_fast.eval.runner import evaluate

    root = _colour_dataset(tmp_path / "nosplit", n=30, with_split=False)
    recs = read_manifest(str(root))
    tok = FakeTokenizer()
    for group_key in (None, "patient_id"):
        res = evaluate(FakeModel(tok), root, tasks="retrieval", tokenizer=tok, image_size=32,
                       group_key=group_key, n_boot=10, oracle=False)
        test = select_split(recs, "test", group_key=group_key)
        train = select_split(recs, "train", group_key=group_key)
        assert res["n_images"] == len(test) > 0 and res["split_rule"]["group_key"] == group_key
        assert not {r["image"] for r in test} & {r["image"] for r in train}
        if group_key:
            assert not {r["patient_id"] for r in test} & {r["patient_id"] for r in train}
    # --split val with the trainer's val_fraction: carved out of train, never out of test
    val = evaluate(FakeModel(tok), root, tasks="retrieval", split="val", tokenizer=tok,
                   image_size=32, val_fraction=0.3, n_boot=10, oracle=False)
    assert val["n_images"] == len(select_split(recs, "val", val_fraction=0.3)) > 0
    with pytest.raises(ValueError, match="pass the trainer's --val-fraction"):
        evaluate(FakeModel(tok), root, tasks="retrieval", split="val", tokenizer=tok, image_size=32)


# ----------------------------------------------------------------------------- a saved model, the CLI

def _tiny_model(**kw):
    from regionmed_fast.model import create_model
    torch.manual_seed(0)
    return create_model("regionmed-tiny", text="tiny", image_size=32, embed_dim=16,
                        roi={"heads": 1}, vision={"patch_size": 8, "width": 32, "depth": 1, "heads": 1},
                        **kw)


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(pathlib.Path(__file__).resolve().parents[1]),
                                         env.get("PYTHONPATH", "")])
    return env


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "regionmed_fast.cli", "eval", *map(str, args)],
                          env=_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A training-run-like folder: model/ (trained at 48 px, split settings recorded) and a
    checkpoints/last.pt that evaluation must never read (here: not even a valid file)."""
    synthetic = pytest.importorskip("regionmed_fast.data.synthetic")
    root = tmp_path_factory.mktemp("saved")
    synthetic.write_dataset(root / "syn", n=12, size=48, seed=1, split_fraction=0.5)
    m = _tiny_model(trained_image_size=48)
    with torch.no_grad():  # a real region path: the RoI block is the identity at init
        for p in m.roi.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    m.save_pretrained(root / "run" / "model",
                      metadata={"split": {"group_key": "seed", "test_fraction": 0.4, "val_fraction": 0.1}})
    (root / "run" / "checkpoints").mkdir()
    (root / "run" / "checkpoints" / "last.pt").write_bytes(b"not a pickle")
    return root


def test_cli_matches_in_process_and_reads_no_training_state(saved_run, capsys):
    # one process (the command) and this one give the same numbers, to the last digit; the
    # image size and split settings come from config.json, checkpoints/last.pt is never read
    from regionmed_fast.eval.report import clean
    from regionmed_fast.eval.runner import evaluate, load_model

    rc = _cli("--model", saved_run / "run", "--data", saved_run / "syn", "--tasks",
              "retrieval,zeroshot", "--split", "all", "--json")
    assert rc.returncode == 0, rc.stderr[-3000:]
    printed = json.loads(rc.stdout)
    here = evaluate(load_model(saved_run / "run"), saved_run / "syn", tasks="retrieval,zeroshot",
                    split="all")
    assert printed == json.loads(json.dumps(clean(_strip_timing(here))))
    assert printed["image_size"] == 48 and printed["region_aware"] is True
    assert printed["split_rule"]["group_key"] == "seed"  # the run's recorded split settings
    assert printed["split_rule"]["source"]["val_fraction"] == "model metadata"
    assert printed["rows"] == ["global", "proposed_boxes"]
    from regionmed_fast.cli import main
    assert main(["eval", "--model", str(saved_run / "nowhere"), "--data", str(saved_run / "syn")]) == 2
    assert "no such file" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_twice_same_report(saved_run, tmp_path):
    reps = [tmp_path / "a", tmp_path / "b"]
    for rep in reps:
        rc = _cli("--model", saved_run / "run", "--data", saved_run / "syn", "--report", rep,
                  "--split", "all")
        assert rc.returncode == 0, rc.stderr[-3000:]
    a, b = ((rep / "results.json").read_text() for rep in reps)
    assert a == b  # deterministic across processes, byte for byte, every task
    saved = json.loads(a)
    assert set(saved["tasks"]) == {"retrieval", "zeroshot", "grounding", "vqa"}
    assert all((reps[0] / f).is_file() for f in saved["report_files"])
    out = rc.stdout
    assert "proposed_boxes" in out and "Oracle boxes, apart from the headline" in out
    assert "Intervals: 95 % bootstrap" in out and "blank image" in out


def test_eval_in_process_is_deterministic_with_dropout_model(saved_run):
    from regionmed_fast.eval.runner import evaluate, load_model

    model = load_model(saved_run / "run")
    assert not model.training
    model.train()  # as a trainer hands it over: dropout on in the text tower
    runs = [_strip_timing(evaluate(model, saved_run / "syn", tasks="retrieval,zeroshot", split="all",
                                   n_boot=50)) for _ in range(2)]
    assert json.dumps(runs[0], sort_keys=True) == json.dumps(runs[1], sort_keys=True)
    assert model.training


def test_siglip_bias_model_evaluates_like_its_twin(saved_run, tmp_path):
    # a SigLIP model (learnable logit_bias) saves, loads and evaluates; the bias shifts logits,
    # not cosines, so the numbers equal those of the same weights without it
    from regionmed_fast.eval.runner import evaluate, load_model

    results = []
    for bias in (None, -10.0):
        _tiny_model(init_logit_bias=bias).save_pretrained(tmp_path / str(bias))
        m = load_model(tmp_path / str(bias))
        assert (m.logit_bias is None) == (bias is None)
        if bias is not None:
            assert m.logit_bias.item() == -10.0
        results.append(_strip_timing(evaluate(m, saved_run / "syn", tasks="retrieval,zeroshot",
                                              split="all", n_boot=20)))
    assert json.dumps(results[0], sort_keys=True) == json.dumps(results[1], sort_keys=True)


def test_eval_imports_no_training_code():
    code = ("import sys, regionmed_fast.eval, regionmed_fast.eval.cli, regionmed_fast.eval.runner; "
            "bad = sorted(m for m in sys.modules if m.startswith('regionmed_fast.train')); "
            "print(bad); sys.exit(1 if bad else 0)")
    rc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True,
                        timeout=120)
    assert rc.returncode == 0, rc.stdout + rc.stderr


def test_report_without_matplotlib(colour_data, tmp_path):
    # a core install (no 'report' extra): the tables are written, the figures skipped in one line
    code = f"""
import sys
sys.modules["matplotlib"] = None
sys.path.insert(0, {str(pathlib.Path(__file__).parent)!r})
import logging
logging.basicConfig(level=logging.WARNING, format="%(message)s")
from test_eval import FakeModel, FakeTokenizer
from regionmed_fast.eval.runner import evaluate
tok = FakeTokenizer()
res = evaluate(FakeModel(tok), {str(colour_data)!r}, tasks="retrieval,zeroshot",
               report_dir={str(tmp_path / 'rep')!r}, tokenizer=tok, image_size=32, n_boot=10)
print(res["report_files"])
"""
    rc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True,
                        timeout=300)
    assert rc.returncode == 0, rc.stderr[-3000:]
    assert rc.stderr.count("matplotlib is not installed") == 1
    assert "pip install 'regionmed-fast[report]'" in rc.stderr
    assert sorted(p.name for p in (tmp_path / "rep").iterdir()) == ["report.md", "results.json", "timing.json"]
    assert "figures skipped" in (tmp_path / "rep" / "report.md").read_text()


# ----------------------------------------------------------------------------- the real shared data

def test_real_data_batches_and_proposals(shared_data):
    # the eval data path on the real sets: the one batch path, proposals for every image
    from regionmed_fast.eval.grounding import evaluate_grounding

    model = _tiny_model().eval()
    for name in ("covid_chestxray", "ph2_dermoscopy"):
        recs = read_manifest(str(shared_data / name))
        test = select_split(recs, "test", group_key="patient_id" if name.startswith("covid") else None)
        es = E.embed_split(model, test[:6], image_size=32, batch_size=3)
        assert es.image_global.shape == (6, 16) and es.proposed.fused.shape == (6, 16)
        assert [b.shape[0] for b in es.proposed.boxes] == [model.config.proposer.num_boxes] * 6
        for b in es.proposed.boxes + es.boxes:
            assert (b >= 0).all() and (b <= 32).all()
        g = evaluate_grounding(es, model, model.tokenize)
        assert g["pointing_game"]["n_queries"] > 0
