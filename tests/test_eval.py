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


# ----------------------------------------------------------------------------- task runners
# A hand-built model whose embeddings are exact by construction: a text embeds as the sum of
# one-hots of the colour words it contains; an image (or box, or patch) embeds as the histogram
# of its pixels' nearest colours. A tiny colour dataset: background colour = class label, boxes
# painted in other colours with phrases naming them.

import json  # noqa: E402

import numpy as np  # noqa: E402

from regionmed_fast.eval import embed as E  # noqa: E402

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


class FakeModel(torch.nn.Module):
    """Perfect-by-construction embeddings (see above); D = 6 colours + 1 bias dim."""

    def __init__(self, tok: FakeTokenizer, region_aware: bool = True, patch: int = 4):
        super().__init__()
        self.tok, self.region_aware, self.patch = tok, region_aware, patch
        self.w = torch.nn.Parameter(torch.zeros(1))  # so the model has a device
        pal = torch.tensor([COLOURS[n] for n in NAMES], dtype=torch.float32) / 255
        self.register_buffer("pal", pal)

    def encode_text(self, ids, mask=None, normalize=True):
        out = []
        for i in ids[:, 0].tolist():
            words = self.tok.table[i].lower()
            out.append([float(n in words) for n in NAMES] + [0.01])
        e = torch.tensor(out)
        return torch.nn.functional.normalize(e, dim=-1) if normalize else e

    def _onehot(self, images):  # [B,3,H,W] normalised -> [B,6,H,W] nearest-colour one-hot
        mean = torch.tensor(E.CLIP_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(E.CLIP_STD).view(1, 3, 1, 1)
        x = (images * std + mean).permute(0, 2, 3, 1)  # B,H,W,3
        d = ((x[..., None, :] - self.pal) ** 2).sum(-1)
        return torch.nn.functional.one_hot(d.argmin(-1), len(NAMES)).permute(0, 3, 1, 2).float()

    @staticmethod
    def _emb(hist):
        return torch.nn.functional.normalize(torch.cat([hist, torch.full_like(hist[..., :1], 1e-3)], -1), dim=-1)

    def forward(self, batch):
        oh = self._onehot(batch["images"])
        glob = self._emb(oh.mean((2, 3)))
        regions, rb = [], []
        for b, c in enumerate(batch["box_counts"].tolist()):
            for k in range(c):
                x1, y1, x2, y2 = batch["boxes"][b, k].round().long().tolist()
                regions.append(oh[b, :, y1:max(y2, y1 + 1), x1:max(x2, x1 + 1)].mean((1, 2)))
                rb.append(b)
        region = self._emb(torch.stack(regions)) if regions else None
        return {"image_global": glob, "image_fused": glob if self.region_aware else None,
                "region": region if self.region_aware else None,
                "region_batch": torch.tensor(rb, dtype=torch.long),
                "text": self.encode_text(batch["text_ids"]), "logit_scale": torch.tensor(10.0),
                "logit_bias": None}

    def patch_text_similarity(self, images, text_emb):
        oh = torch.nn.functional.avg_pool2d(self._onehot(images), self.patch)  # B,6,h,w
        emb = self._emb(oh.permute(0, 2, 3, 1))
        return torch.einsum("bhwd,bd->bhw", emb, text_emb)


def _colour_dataset(root, n=18, size=32, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    lines = []
    for i in range(n):
        cls = ["red", "green", "blue"][i % 3]
        img = np.zeros((size, size, 3), np.uint8) + np.array(COLOURS[cls], np.uint8)
        spots = rng.choice(["yellow", "cyan", "magenta"], size=2, replace=False)
        regions = []
        for j, sp in enumerate(spots):
            x0 = 2 + 16 * j + int(rng.integers(0, 4))
            y0 = int(rng.integers(2, 18))
            img[y0:y0 + 10, x0:x0 + 10] = COLOURS[sp]
            regions.append({"bbox": [x0, y0, x0 + 10, y0 + 10], "text": f"a {sp} spot", "label": sp,
                            "kind": sp, "location": "left" if j == 0 else "right"})
        name = f"images/{i:03d}.png"
        Image.fromarray(img).save(root / name)
        # two images per text: duplicates exercise the dedup rule
        lines.append({"image": name, "width": size, "height": size,
                      "text": f"a {cls} image with a {spots[0]} spot and a {spots[1]} spot"
                      if i % 2 else f"a {cls} image",
                      "regions": regions, "labels": [cls], "split": "test" if i % 3 == i % 2 else "train"})
    (root / "annotations.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    return root


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory):
    return _colour_dataset(tmp_path_factory.mktemp("colour"))


def test_zeroshot_perfect_model_scores_one(colour_data):
    from regionmed_fast.eval.zeroshot import evaluate_zeroshot

    tok = FakeTokenizer()
    model = FakeModel(tok)
    recs = E.read_records(colour_data)
    es = E.embed_split(model, recs, tok, image_size=32, batch_size=5)
    res = evaluate_zeroshot(es, model, tok)
    assert res["classes"] == ["blue", "green", "red"]
    for kind in ("global", "region_aware"):
        r = res["by_embedding"][kind]
        assert r["accuracy"] == 1.0 and r["balanced_accuracy"] == 1.0 and r["macro_auroc"] == 1.0
        assert r["confusion_matrix"] == [[6, 0, 0], [0, 6, 0], [0, 0, 6]]
    assert res["majority_baseline"] == {"accuracy": pytest.approx(1 / 3), "balanced_accuracy": pytest.approx(1 / 3)}


def test_grounding_perfect_model(colour_data):
    from regionmed_fast.eval.grounding import evaluate_grounding

    tok = FakeTokenizer()
    model = FakeModel(tok)
    es = E.embed_split(model, E.read_records(colour_data), tok, image_size=32, batch_size=4)
    res = evaluate_grounding(es, model, tok, batch_size=3)
    assert res["box_choice"]["accuracy"] == 1.0
    assert res["box_choice"]["chance"] == 0.5
    assert res["box_choice"]["n_queries"] == 36
    assert res["pointing_game"]["hit_rate"] == 1.0
    # a model that is blind to the box content chooses no better than a tie -> counted wrong
    es.region = torch.ones_like(es.region)
    assert evaluate_grounding(es, model, tok)["box_choice"]["accuracy"] == 0.0


def test_retrieval_dedup_and_global_only(colour_data):
    from regionmed_fast.eval.retrieval import evaluate_retrieval

    tok = FakeTokenizer()
    model = FakeModel(tok, region_aware=False)
    es = E.embed_split(model, E.read_records(colour_data), tok, image_size=32, batch_size=7)
    res = evaluate_retrieval(es, model, tok, chunk_size=5)
    assert res["n_unique_texts"] < res["n_images"]  # "a red image" etc. shared
    assert set(res["image_to_text"]) == {"global"}
    assert "skipped" in res["region_to_text"]
    s = res["text_to_image"]["global"]
    assert s["n_queries"] == res["n_unique_texts"] and 0 < s["R@1"] <= 1
    # region-to-text with the region-aware model: every spot is found by its phrase
    model = FakeModel(tok)
    es = E.embed_split(model, E.read_records(colour_data), tok, image_size=32)
    assert evaluate_retrieval(es, model, tok)["region_to_text"]["R@1"] == 1.0


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


def test_evaluate_end_to_end_report(colour_data, tmp_path):
    from regionmed_fast.eval.runner import evaluate

    tok = FakeTokenizer()
    model = FakeModel(tok)
    out = tmp_path / "report"
    res = evaluate(model, colour_data, report_dir=out, split="test", tokenizer=tok, image_size=32,
                   batch_size=4)
    assert res["n_images"] == 6
    assert res["vqa"]["qa_source"].startswith("generated")
    assert res["vqa"]["n_closed"] > 0 and res["vqa"]["n_open"] > 0
    files = res["report_files"]
    assert {"recall_at_k.png", "zeroshot_confusion.png", "retrieval_grid.png", "grounding_examples.png",
            "results.json", "report.md"} <= set(files)
    for f in files:
        assert (out / f).stat().st_size > 0, f
    assert sorted(p.name for p in out.iterdir()) == sorted(files)
    saved = json.loads((out / "results.json").read_text())
    assert saved["report_files"] == files
    md = (out / "report.md").read_text()
    assert "generated from annotations" in md and "| region to text |" in md


def test_synthetic_end_to_end_grounding_vqa(tmp_path):
    synthetic = pytest.importorskip("regionmed_fast.data.synthetic")
    from regionmed_fast.eval.runner import evaluate

    synthetic.write_dataset(tmp_path / "syn", n=24, size=32, seed=0, split_fraction=0.4)
    tok = FakeTokenizer()
    res = evaluate(FakeModel(tok), tmp_path / "syn", tasks="zeroshot,grounding,vqa", tokenizer=tok, image_size=32)
    assert "multilabel_macro_auroc" in res["zeroshot"]["by_embedding"]["global"]
    assert res["vqa"]["qa_source"] == "qa.jsonl" and res["vqa"]["n_test"] > 0
    assert 0 <= res["vqa"]["accuracy"] <= 1
    assert res["grounding"]["pointing_game"]["n_queries"] > 0
    with pytest.raises(ValueError, match="tasks"):
        evaluate(FakeModel(tok), tmp_path / "syn", tasks="retrieval,bogus", tokenizer=tok, image_size=32)


def test_cli_on_saved_real_model(tmp_path, capsys):
    model_pkg = pytest.importorskip("regionmed_fast.model")
    synthetic = pytest.importorskip("regionmed_fast.data.synthetic")
    from regionmed_fast.eval.cli import eval_main

    synthetic.write_dataset(tmp_path / "syn", n=12, size=32, seed=1, split_fraction=0.5)
    m = model_pkg.create_model_and_transforms(
        "regionmed-tiny", text="tiny", image_size=32, embed_dim=16, roi={"heads": 1},
        vision={"patch_size": 8, "width": 32, "depth": 1, "heads": 1})[0]
    m.save_pretrained(tmp_path / "run" / "model")
    rep = tmp_path / "rep"
    rc = eval_main(["--model", str(tmp_path / "run"), "--data", str(tmp_path / "syn"),
                    "--tasks", "retrieval,zeroshot,grounding", "--report", str(rep)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "image_to_text" in printed and "region_aware" in printed
    saved = json.loads((rep / "results.json").read_text())
    assert saved["image_size"] == 32 and saved["region_aware"] is True
    assert all((rep / f).is_file() for f in saved["report_files"])
    assert eval_main(["--model", str(tmp_path / "nowhere"), "--data", str(tmp_path / "syn")]) == 2
    assert "no such file" in capsys.readouterr().err


def _real_data_script():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "real_data_eval.py"
    spec = importlib.util.spec_from_file_location("real_data_eval", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_real_data_split_keeps_patients_apart(shared_data, tmp_path):
    mod = _real_data_script()
    info = mod.prepare(shared_data / "covid_chestxray", tmp_path / "covid", "patient_id", None, 0.3)
    recs = E.read_records(tmp_path / "covid")
    side = {}
    for r in recs:
        side.setdefault(r["patient_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in side.values())
    assert info["val"] == sum(r["split"] == "test" for r in recs) and 0.15 < info["val"] / info["images"] < 0.45
    # the eval reader sees the same split the trainer will (records carry "split")
    assert len(E.split_records(recs, "val")) == info["val"]
    info = mod.prepare(shared_data / "ph2_dermoscopy", tmp_path / "ph2", "image", "clinical_diagnosis", 0.3)
    recs = E.read_records(tmp_path / "ph2")
    for dx in ("common nevus", "atypical nevus", "melanoma"):
        n = sum(r["clinical_diagnosis"] == dx for r in recs)
        v = sum(r["clinical_diagnosis"] == dx and r["split"] == "test" for r in recs)
        assert v == round(0.3 * n)
