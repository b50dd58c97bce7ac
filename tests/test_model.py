"""RegionMedCLIP: shapes, the no-box fallback, box formats, save/load, config mismatch errors,
the offline tokenizer and the real MiniLM text tower. Tiny config throughout."""
from __future__ import annotations

import json
import os
import re

import pytest
import torch
import torch.nn.functional as F

from regionmed_fast.model import (RegionMedCLIP, create_model, create_model_and_transforms,
                                  get_tokenizer, list_models, model_config)
from regionmed_fast.model.text import TextConfig, TextEncoder, minilm_path


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer("regionmed-tiny")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = create_model("regionmed-tiny", text="tiny").eval()
    # zero-initialised residual branches make the fused token equal the global one at init;
    # perturb them so the tests see a real region path
    with torch.no_grad():
        for p in m.roi.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def _batch(tok, counts=(2, 0, 1), size=128):
    torch.manual_seed(1)
    B, kmax = len(counts), max(max(counts), 1)
    boxes = torch.zeros(B, kmax, 4)
    region_texts = []
    for i, c in enumerate(counts):
        for j in range(c):
            x, y = 10.0 + 30 * j, 20.0 + 25 * i
            s = 3.0 if j == 0 else 40.0  # a 3-pixel lesion and a large one
            boxes[i, j] = torch.tensor([x, y, x + s, y + s])
        region_texts.append([f"finding {j} of image {i}" for j in range(c)])
    texts = [f"image {i} text" for i in range(B)]
    ids, mask = tok(texts)
    rids, rmask = tok([t for r in region_texts for t in r])
    return {"images": torch.randn(B, 3, size, size), "boxes": boxes,
            "box_counts": torch.tensor(counts), "texts": texts, "region_texts": region_texts,
            "text_ids": ids, "text_mask": mask, "region_text_ids": rids,
            "region_text_mask": rmask}


def _unit(t):
    return torch.allclose(t.norm(dim=-1), torch.ones(t.shape[0]), atol=1e-5)


def test_forward_shapes_with_boxes(model, tok):
    b = _batch(tok)
    with torch.no_grad():
        out = model(b)
    D, K = model.config.embed_dim, 3
    assert set(out) == {"image_global", "image_fused", "region", "region_batch", "text",
                        "region_text", "logit_scale", "logit_bias"}
    assert out["image_global"].shape == out["image_fused"].shape == out["text"].shape == (3, D)
    assert out["region"].shape == out["region_text"].shape == (K, D)
    assert out["region_batch"].tolist() == [0, 0, 2] and out["region_batch"].dtype == torch.long
    for k in ("image_global", "image_fused", "region", "text", "region_text"):
        assert _unit(out[k]), k
    assert out["logit_scale"].ndim == 0
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert out["logit_bias"] is None
    # image 1 has no box: its fused embedding is its global one; the others differ
    assert torch.equal(out["image_fused"][1], out["image_global"][1])
    assert not torch.allclose(out["image_fused"][0], out["image_global"][0])


def test_forward_without_boxes_and_raw_texts(model, tok):
    b = _batch(tok)
    plain = {"images": b["images"], "texts": b["texts"]}  # no ids: tokenised by the model
    with torch.no_grad():
        out = model(plain)
        ref = model(b)
    assert out["image_fused"] is None and out["region"] is None and out["region_text"] is None
    assert out["region_batch"].shape == (0,)
    torch.testing.assert_close(out["text"], ref["text"])
    torch.testing.assert_close(out["image_global"], ref["image_global"])


def test_batch_with_zero_boxes_backward(model, tok):
    b = _batch(tok, counts=(0, 0))
    model.zero_grad()
    out = model(b)
    assert out["region"].shape == (0, model.config.embed_dim)
    assert out["region_text"].shape == (0, model.config.embed_dim)
    assert torch.equal(out["image_fused"], out["image_global"])
    (out["image_fused"].sum() + out["text"].sum()).backward()
    # every ROI parameter is in the graph (DDP needs that), with zero gradient
    for name, p in model.roi.named_parameters():
        assert p.grad is not None and not p.grad.abs().any(), name
    model.zero_grad()


def test_region_loss_reaches_the_image_tower(model, tok):
    b = _batch(tok)
    model.zero_grad()
    out = model(b)
    (out["region"] * out["region_text"]).sum().backward()
    assert next(model.visual.patch_embed.parameters()).grad.abs().sum() > 0
    assert model.roi.gate_weight.grad.abs().sum() > 0
    assert model.roi.geometry[0].weight.grad.abs().sum() > 0
    model.zero_grad()


def test_box_formats_agree(model, tok):
    b = _batch(tok)
    boxes, counts = b["boxes"], b["box_counts"]
    as_list = [boxes[i, :int(c)] for i, c in enumerate(counts)]
    rois = torch.cat([torch.cat([torch.full((int(c), 1), float(i)), boxes[i, :int(c)]], 1)
                      for i, c in enumerate(counts)])
    with torch.no_grad():
        e1 = model.encode_image(b["images"], boxes, box_counts=counts)
        e2 = model.encode_image(b["images"], as_list)
        e3 = model.encode_image(b["images"], rois[torch.tensor([2, 0, 1])])  # any roi order
        g = model.encode_image(b["images"])
    torch.testing.assert_close(e1, e2)
    torch.testing.assert_close(e1, e3)
    torch.testing.assert_close(e1[1], g[1])


def test_roi_pooling_matches_torchvision(model):
    # the region feature is roi_pool_fuse of the patch grid at spatial_scale grid/image
    from torchvision.ops import roi_align
    from regionmed_fast.model.roi_processor import grow_rois
    torch.manual_seed(2)
    images = torch.randn(2, 3, 128, 128)
    rois = torch.tensor([[0, 5.0, 6.0, 60.0, 70.0], [1, 100.0, 100.0, 103.0, 104.0]])
    with torch.no_grad():
        pooled, grid = model.visual(images)
        grown = grow_rois(rois, model.roi.min_box, 128, 128)
        assert (grown[1, 3] - grown[1, 1]).item() == pytest.approx(16.0)
        r = roi_align(grid.permute(0, 3, 1, 2), grown, 2, 8 / 128, 2, True).mean((2, 3))
        g = pooled[rois[:, 0].long()]
        w, bias = model.roi.gate_weight, model.roi.gate_bias
        a = torch.sigmoid(r @ w[0] + g @ w[1] + bias)[:, None]
        want = a * r + (1 - a) * g
        from regionmed_fast.model.roi_processor import roi_pool_fuse_nhwc
        got = roi_pool_fuse_nhwc(grid, grown, pooled, w, bias, spatial_scale=8 / 128,
                                 output_size=2, sampling_ratio=2, aligned=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_bad_boxes_are_checked_once_by_the_op(model, monkeypatch):
    import regionmed_fast.ops.roi as roi_ops
    calls = []
    real = roi_ops._check_rois
    monkeypatch.setattr(roi_ops, "_check_rois", lambda *a: (calls.append(1), real(*a)))
    images = torch.randn(1, 3, 128, 128)
    with pytest.raises(ValueError, match="roi_pool_fuse: box 0 has a NaN"):
        model.encode_image(images, [torch.tensor([[1.0, float("nan"), 5.0, 5.0]])])
    # reversed corners are rejected, not swapped; also when growing or clamping could hide them
    with pytest.raises(ValueError, match="reversed corners"):
        model.encode_image(images, [torch.tensor([[30.0, 10.0, 28.0, 12.0]])])
    with pytest.raises(ValueError, match="reversed corners"):
        model.encode_image(images, [torch.tensor([[300.0, 10.0, 200.0, 20.0]])])
    with pytest.raises(ValueError, match="batch index"):
        model.encode_image(images, torch.tensor([[1.0, 0.0, 0.0, 9.0, 9.0]]))
    with pytest.raises(ValueError, match="box_counts"):
        model.encode_image(images, torch.zeros(1, 2, 4), box_counts=torch.tensor([3]))
    with pytest.raises(ValueError, match="list of 2"):
        model.encode_image(images, [torch.zeros(0, 4)] * 2)
    assert len(calls) == 4  # the op's one check per call; the model adds none
    # a box partly outside the image pools its inside part: the same as the clamped box
    with torch.no_grad():
        out = model.encode_image(images, [torch.tensor([[-5.0, 10.0, 300.0, 20.0]])])
        inside = model.encode_image(images, [torch.tensor([[0.0, 10.0, 128.0, 20.0]])])
    torch.testing.assert_close(out, inside)


def test_global_only_baseline(tok):
    torch.manual_seed(0)
    m = create_model("regionmed-tiny", text="tiny", use_roi=False).eval()
    assert m.roi is None and not any(k.startswith("roi.") for k in m.state_dict())
    with torch.no_grad():
        out = m(_batch(tok))
    assert out["image_fused"] is None and out["region"] is None and out["region_text"] is None
    with pytest.raises(RuntimeError, match="use_roi"):
        m.encode_regions(torch.randn(1, 3, 128, 128), [torch.zeros(1, 4)])


def test_save_load_round_trip(model, tok, tmp_path):
    split = {"group_key": "patient_id", "test_fraction": 0.3, "val_fraction": 0.1}
    model.save_pretrained(tmp_path, metadata={"split": split})
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    from safetensors import safe_open
    with safe_open(tmp_path / "model.safetensors", "pt") as f:  # plain safetensors, no pickle
        assert "roi.gate_weight" in f.keys()
    loaded = RegionMedCLIP.from_pretrained(tmp_path).eval()
    assert loaded.pretrained_metadata == {"split": split}
    assert loaded.config == model.config
    b = _batch(tok)
    with torch.no_grad():
        a, c = model(b), loaded(b)
    for k in ("image_global", "image_fused", "region", "text", "region_text", "logit_scale"):
        assert torch.equal(a[k], c[k]), k
    # the factory loads the same folder by name
    m2 = create_model(str(tmp_path)).eval()
    with torch.no_grad():
        assert torch.equal(m2.encode_image(b["images"]), model.encode_image(b["images"]))


def test_mismatched_config_is_a_clear_error(model, tmp_path):
    model.save_pretrained(tmp_path)
    other = model_config("regionmed-tiny", text="tiny", vision={"width": 96})
    with pytest.raises(ValueError) as e:
        RegionMedCLIP.from_pretrained(tmp_path, config=other)
    msg = str(e.value)
    assert "vision.width: 192 (checkpoint) vs 96 (model)" in msg
    assert "shape mismatches" in msg and re.search(r"\(\d+ in all\)", msg)
    with pytest.raises(ValueError, match=r"unexpected keys: roi\."):
        RegionMedCLIP.from_pretrained(tmp_path, config=model_config(
            "regionmed-tiny", text="tiny", use_roi=False))
    cfg = json.loads((tmp_path / "config.json").read_text())
    # a folder written before the proposer existed loads with the default proposer
    old = json.loads(json.dumps(cfg))
    del old["config"]["proposer"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert RegionMedCLIP.read_config(tmp_path).proposer.num_boxes == 3
    cfg["config"]["proposer"]["num_boxes"] = 0
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="proposer: proposer num_boxes must be a positive"):
        RegionMedCLIP.read_config(tmp_path)
    cfg["config"]["proposer"]["num_boxes"] = 3
    cfg["config"]["vision"]["widht"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unknown keys.*widht"):
        RegionMedCLIP.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        RegionMedCLIP.from_pretrained(tmp_path / "nowhere")


def test_factory_names_overrides_and_transforms():
    assert {"regionmed-tiny", "regionmed-base"} <= set(list_models())
    with pytest.raises(ValueError, match="unknown model"):
        model_config("regionmed-huge")
    with pytest.raises(ValueError, match="unknown keys.*depht"):
        model_config("regionmed-tiny", vision={"depht": 2})
    base = model_config("regionmed-base")
    assert (base.vision.width, base.vision.depth, base.vision.patch_size) == (768, 12, 16)
    import regionmed_fast.model as pkg
    assert not hasattr(pkg, "ROIConfig") and not hasattr(pkg, "ROIProcessor")  # one spelling
    from PIL import Image
    m, train_tf, eval_tf = create_model_and_transforms("regionmed-tiny", text="tiny",
                                                       image_size=64, embed_dim=32)
    x = eval_tf(Image.new("L", (100, 80), 128))
    assert x.shape == (3, 64, 64) and train_tf(Image.new("RGB", (50, 50))).shape == (3, 64, 64)
    assert m.encode_image(x[None]).shape == (1, 32)
    # the trained size, when the trainer recorded one, is the preprocess size
    assert create_model_and_transforms("regionmed-tiny", text="tiny", trained_image_size=96
                                       )[2](Image.new("RGB", (50, 50))).shape == (3, 96, 96)


def test_preprocess_equals_the_eval_batch_path(tmp_path):
    # what a user's preprocess gives is what evaluation (data.batch.build_batch) feeds the model
    import numpy as np
    from PIL import Image

    from regionmed_fast.data.batch import build_batch
    from regionmed_fast.data.manifest import read_manifest
    from regionmed_fast.model import image_transform
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    Image.fromarray(rng.integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(tmp_path / "images/a.png")
    (tmp_path / "annotations.jsonl").write_text(json.dumps(
        {"image": "images/a.png", "width": 90, "height": 70, "text": "x", "regions": []}) + "\n")
    batch = build_batch(read_manifest(str(tmp_path)), image_size=64, train=False)
    with Image.open(tmp_path / "images/a.png") as im:
        assert torch.equal(image_transform(64, False)(im), batch["images"][0])


def test_vit_other_sizes_and_checkpointing(model):
    images = torch.randn(2, 3, 160, 160)  # progressive stages change the image size
    pooled, grid = model.visual(images)
    assert pooled.shape == (2, 192) and grid.shape == (2, 10, 10, 192)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model.visual(torch.randn(1, 3, 100, 100))
    # activation checkpointing gives the same gradients
    model.train()
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(ckpt)
        model.encode_image(images[:1, :, :128, :128], [torch.tensor([[4.0, 4, 40, 40]])]).sum().backward()
        grads.append(model.visual.blocks[0].attn.qkv.weight.grad.clone())
    model.set_grad_checkpointing(False)
    model.eval()
    model.zero_grad()
    torch.testing.assert_close(grads[0], grads[1])


def test_conv_stem():
    m = create_model("regionmed-tiny", text="tiny", vision={"stem": "conv"}, embed_dim=32)
    pooled, grid = m.visual(torch.randn(2, 3, 96, 96))
    assert pooled.shape == (2, 192) and grid.shape == (2, 6, 6, 192)
    with pytest.raises(ValueError, match="power-of-two"):
        create_model("regionmed-tiny", text="tiny", vision={"stem": "conv", "patch_size": 12,
                                                            "image_size": 96})
    with pytest.raises(ValueError, match="stem"):
        create_model("regionmed-tiny", text="tiny", vision={"stem": "hybrid"})


def test_patch_text_similarity(model, tok):
    images = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        t = model.encode_text(*tok(["a nodule", "a mass"]))
        s = model.patch_text_similarity(images, t)
        s1 = model.patch_text_similarity(images, t[0])
        _, grid = model.visual(images)
        patches = F.normalize(model.image_proj(grid), dim=-1)
        # a text embedding equal to one patch's embedding points at that patch, with cosine 1
        target = model.patch_text_similarity(images, patches[:, 3, 5])
    assert s.shape == s1.shape == (2, 8, 8)
    torch.testing.assert_close(s, torch.einsum("bhwd,bd->bhw", patches, t), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s1[1], torch.einsum("hwd,d->hw", patches[1], t[0]),
                               atol=1e-5, rtol=1e-5)
    assert [divmod(int(m.argmax()), 8) for m in target] == [(3, 5), (3, 5)]
    torch.testing.assert_close(target[:, 3, 5], torch.ones(2), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="text_emb"):
        model.patch_text_similarity(torch.randn(2, 3, 128, 128), torch.randn(3, 256))


def test_timm_backbone():
    pytest.importorskip("timm")
    m = create_model("timm:vit_tiny_patch16_224", text="tiny", image_size=64, embed_dim=32)
    pooled, grid = m.visual(torch.randn(1, 3, 64, 64))
    assert pooled.shape == (1, 192) and grid.shape == (1, 4, 4, 192)
    assert m.encode_image(torch.randn(1, 3, 64, 64), [torch.tensor([[1.0, 2, 30, 40]])]).shape == (1, 32)


def test_tokenizer_offline(tok, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = get_tokenizer("minilm", context_length=8)
    ids, mask = t(["a 6 mm calcified nodule in the right upper zone of the lung", "hi"])
    assert ids.dtype == mask.dtype == torch.long and ids.shape == mask.shape == (2, 8)
    assert mask[1].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]  # [CLS] hi [SEP], padded
    ids, mask = tok(["short", "a somewhat longer text"])
    assert ids.shape[1] == mask.sum(1).max()  # padded to the longest, not to 77
    with pytest.raises(TypeError, match="list of str"):
        tok([1, 2])


def test_real_minilm_matches_mean_pooling(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    path = minilm_path()
    texts = ["a small nodule in the right upper lobe", "a pulmonary nodule in the right lung",
             "a blue-white veil over a pigmented skin lesion"]
    enc = TextEncoder(TextConfig(name="minilm")).eval()
    tok = get_tokenizer("minilm")
    with torch.no_grad():
        ours = F.normalize(enc(*tok(texts)), dim=-1)
        hf_tok = AutoTokenizer.from_pretrained(path)
        hf = AutoModel.from_pretrained(path).eval()
        x = hf_tok(texts, padding=True, return_tensors="pt")
        h = hf(**x).last_hidden_state
        m = x["attention_mask"][..., None].float()
        want = F.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    assert ours.shape == (3, 384)
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-5)
    sim = ours @ ours.T
    assert sim[0, 1] > sim[0, 2] + 0.2  # pretrained: nodule texts are closer to each other


def test_text_cache_for_a_frozen_tower(model, tok):
    # on by default; it acts only while every text parameter is frozen
    ids, mask = tok(["a 6 mm nodule", "a large left pleural effusion", "a 6 mm nodule"])
    with torch.no_grad():
        want = model.encode_text(ids, mask)
    calls = []
    hook = model.text.register_forward_hook(lambda *a: calls.append(a[1][0].shape[0]))
    try:
        for p in model.text.parameters():
            p.requires_grad_(False)
        model.train()  # misses still run without dropout: a frozen tower is deterministic
        got = model.encode_text(ids, mask)
        again = model.encode_text(ids[1:], mask[1:])
        assert calls == [2]  # two distinct texts encoded once, the rest from the cache
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(again, want[1:], atol=1e-5, rtol=1e-5)
        got.sum().backward()  # text_proj still trains
        assert model.text_proj.weight.grad is not None
        with torch.no_grad():  # changed text weights (a stage that trained them) empty the cache
            model.text.transformer.embeddings.word_embeddings.weight.mul_(1.0)
        model.encode_text(ids, mask)
        assert calls == [2, 2]
    finally:
        hook.remove()
        for p in model.text.parameters():
            p.requires_grad_(True)
        model.eval()
        model.zero_grad()


@pytest.mark.gpu
def test_cuda_bf16_autocast_matches_cpu(model, tok):
    b = _batch(tok)
    with torch.no_grad():
        want = model(b)
    m = create_model("regionmed-tiny", text="tiny")
    m.load_state_dict(model.state_dict())
    m = m.cuda()
    cb = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in b.items()}
    m.eval()
    with torch.autocast("cuda", dtype=torch.bfloat16), torch.no_grad():
        got = m(cb)
    for k in ("image_global", "image_fused", "region", "text", "region_text"):
        cos = (got[k].float().cpu() * want[k]).sum(-1)
        assert cos.min() > 0.98, (k, cos)
    m.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = m(cb)
        loss = ((out["region"] * out["region_text"]).float().sum()
                + (out["image_fused"] * out["text"]).float().sum())
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    assert m.roi.gate_weight.grad.abs().sum() > 0
