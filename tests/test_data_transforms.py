"""Box-aware transforms: a filled box drawn into the image is still framed by the transformed
box, on every backend (CPU path; DALI CPU here; DALI GPU under -m gpu); a flip swaps the texts'
side words and the box still frames the drawn pixels; the box rule."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from data_helpers import record, write_dataset, write_image

from regionmed_fast.data.loader import make_loader
from regionmed_fast.data.transforms import (CropParams, denormalize, sample_crop, sample_rng,
                                            transform_boxes)

BOX = (50, 40, 130, 110)  # [x1, x2) x [y1, y2) drawn bright on a dark image
W, H, S = 200, 160, 96


def _dali_ok() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        return True
    except Exception:
        return False


@pytest.fixture(scope="module")
def boxed_dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("boxed"))
    recs = []
    for i in range(8):
        ext = "jpg" if i % 2 == 0 else "png"
        name = f"b{i}.{ext}"
        write_image(os.path.join(root, "images", name), W, H, box=BOX, seed=i)
        recs.append(record(name, W, H, boxes=[BOX]))
    return write_dataset(root, recs)


def _check_framed(batch, tol=1.5):
    imgs = denormalize(batch["images"].float().cpu()).mean(1)  # [B, S, S] grey
    checked = 0
    for i in range(imgs.shape[0]):
        bright = (imgs[i] > 135).nonzero()
        if int(batch["box_counts"][i]) == 0:
            continue
        x1, y1, x2, y2 = batch["boxes"][i, 0].tolist()
        assert bright.numel(), "box kept but no bright pixel left"
        ys, xs = bright[:, 0].float(), bright[:, 1].float()
        got = (xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1)
        for g, e in zip(got, (x1, y1, x2, y2)):
            assert abs(g - e) <= tol, f"sample {i}: bright pixels span {got}, box says {(x1, y1, x2, y2)}"
        checked += 1
    return checked


@pytest.mark.parametrize("backend", ["cpu", pytest.param("dali", marks=pytest.mark.skipif(
    not _dali_ok(), reason="NVIDIA DALI not installed"))])
@pytest.mark.parametrize("train", [True, False])
def test_box_still_frames_drawn_box(boxed_dataset, backend, train):
    dl = make_loader(boxed_dataset, image_size=S, batch_size=8, train=train, backend=backend,
                     num_workers=0, seed=3, device="cpu")
    checked = 0
    flips = set()
    for epoch in range(3 if train else 1):
        for batch in dl:
            assert batch["images"].shape == (8, 3, S, S) and batch["images"].dtype == torch.float32
            checked += _check_framed(batch)
            flips |= {m["crop"][4] for m in batch["meta"]}
    assert checked >= (12 if train else 8)
    if train:
        assert flips == {True, False}


@pytest.mark.gpu
def test_box_still_frames_drawn_box_dali_gpu(boxed_dataset):
    pytest.importorskip("nvidia.dali")
    dl = make_loader(boxed_dataset, image_size=S, batch_size=8, train=True, backend="dali",
                     seed=3, device="cuda")
    for batch in dl:
        assert batch["images"].is_cuda
        assert _check_framed(batch) > 0


@pytest.mark.gpu
def test_cpu_path_normalises_on_cuda(boxed_dataset):
    kw = dict(image_size=S, batch_size=4, train=True, num_workers=0, seed=5, backend="cpu")
    a = next(iter(make_loader(boxed_dataset, **kw)))
    b = next(iter(make_loader(boxed_dataset, device="cuda", **kw)))
    assert b["images"].is_cuda
    torch.testing.assert_close(a["images"], b["images"].cpu(), atol=1e-5, rtol=0)


def _bright_span(img_grey: torch.Tensor) -> tuple[float, float, float, float]:
    bright = (img_grey > 135).nonzero()
    ys, xs = bright[:, 0].float(), bright[:, 1].float()
    return xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1


@pytest.mark.skipif(not _dali_ok(), reason="NVIDIA DALI not installed")
def test_dali_cpu_crops_the_pixels_the_cpu_path_crops(boxed_dataset):
    """The same window on both backends, seen in the pixels: the drawn box lands on the same
    output pixels (1.5 px) in DALI's image and in the CPU path's, and the images agree."""
    kw = dict(image_size=S, batch_size=4, train=True, num_workers=0, seed=5, shuffle=False)
    a = list(make_loader(boxed_dataset, backend="cpu", **kw))
    b = list(make_loader(boxed_dataset, backend="dali", device="cpu", **kw))
    n = 0
    for x, y in zip(a, b):
        gx, gy = (denormalize(t["images"].float().cpu()).mean(1) for t in (x, y))
        for i in range(gx.shape[0]):
            if not ((gx[i] > 135).any() and (gy[i] > 135).any()):
                continue
            for u, v in zip(_bright_span(gx[i]), _bright_span(gy[i])):
                assert abs(u - v) <= 1.5
            n += 1
        assert (x["images"] - y["images"]).abs().mean() < 0.05  # interpolation / decoder rounding
    assert n >= 6


SIDE_TEXT = "Opacity in the left lower zone; LEFT-sided effusion."
SIDE_REGION = "left lower zone opacity"
LEFT_BOX = (10, 60, 70, 120)  # entirely in the left half of the 200 px wide image


@pytest.fixture(scope="module")
def sided_dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("sided"))
    recs = []
    for i in range(4):
        name = f"s{i}.png"
        write_image(os.path.join(root, "images", name), W, H, box=LEFT_BOX, seed=i)
        recs.append(dict(record(name, W, H, boxes=[LEFT_BOX], text=SIDE_TEXT),
                         regions=[{"bbox": list(LEFT_BOX), "text": SIDE_REGION, "label": "left opacity"}]))
    return write_dataset(root, recs)


@pytest.mark.parametrize("backend", ["cpu", pytest.param("dali", marks=pytest.mark.skipif(
    not _dali_ok(), reason="NVIDIA DALI not installed"))])
def test_flip_swaps_side_words_and_the_box_frames_the_same_pixels(sided_dataset, backend):
    kw = dict(image_size=S, batch_size=4, train=True, num_workers=0, seed=0, backend=backend,
              device="cpu", scale=(0.95, 1.0))
    (b,) = list(make_loader(sided_dataset, flip_p=1.0, **kw))
    assert all(m["crop"][4] for m in b["meta"])
    assert b["texts"] == ["Opacity in the right lower zone; RIGHT-sided effusion."] * 4
    assert b["region_texts"] == [["right lower zone opacity"]] * 4
    assert b["region_labels"] == [["left opacity"]] * 4  # labels are class names: kept
    assert _check_framed(b) == 4
    assert (b["boxes"][:, 0, 0] > S / 2).all()  # the drawn box is now on the right
    (k,) = list(make_loader(sided_dataset, flip_p=0.0, **kw))
    assert k["texts"] == [SIDE_TEXT] * 4 and k["region_texts"] == [[SIDE_REGION]] * 4
    assert _check_framed(k) == 4 and (k["boxes"][:, 0, 2] < S / 2).all()


def test_swap_sides_rule():
    from regionmed_fast.data.sides import swap_sides

    cases = {
        "left lower zone": "right lower zone",
        "Left and RIGHT, right-sided, (left)": "Right and LEFT, left-sided, (right)",
        "rightward shift, leftmost rib": "leftward shift, rightmost rib",
        "bright leftover; RT changes; lt hip": "bright leftover; LT changes; rt hip",
        "dextral and sinistral": "sinistral and dextral",
        "no side here": "no side here",
    }
    for text, want in cases.items():
        assert swap_sides(text) == want
        assert swap_sides(swap_sides(text)) == text


def test_box_rule_clip_and_drop():
    p = CropParams(10, 10, 100, 100, False)
    boxes = np.array([[0, 0, 40, 40],       # 900/1600 visible -> kept, clipped
                      [100, 100, 140, 140],  # 100/1600 visible -> dropped (< 0.25)
                      [200, 200, 220, 220],  # outside -> dropped
                      [20, 20, 20.5, 60]],   # 0.5 px wide in the crop -> 1.0 px out at S=200
                     dtype=np.float64)
    out, keep = transform_boxes(boxes, p, 200, 200)
    assert keep.tolist() == [0, 3]
    np.testing.assert_allclose(out[0], [0, 0, 60, 60])
    out, keep = transform_boxes(boxes, p, 100, 100)  # now 0.5 px wide -> dropped (< 1 px)
    assert keep.tolist() == [0]
    flipped, _ = transform_boxes(boxes[:1], CropParams(10, 10, 100, 100, True), 100, 100)
    np.testing.assert_allclose(flipped[0], [70, 0, 100, 30])
    empty, keep = transform_boxes(np.zeros((0, 4)), p, 10, 10)
    assert empty.shape == (0, 4) and keep.shape == (0,)


def test_sample_crop_deterministic_and_in_bounds():
    for i in range(200):
        p = sample_crop(sample_rng(0, 1, i), 300, 120, train=True)
        q = sample_crop(sample_rng(0, 1, i), 300, 120, train=True)
        assert p == q
        assert 0 <= p.x0 and p.x0 + p.w <= 300 and 0 <= p.y0 and p.y0 + p.h <= 120
        assert p.w * p.h >= 0.45 * 300 * 120
    assert sample_crop(sample_rng(0, 0, 0), 300, 120, train=False) == CropParams(0, 0, 300, 120, False)
    assert sample_crop(sample_rng(0, 0, 0), 1, 1, train=True).w == 1


def test_reduced_size_decode_keeps_geometry(tmp_path, monkeypatch):
    """Large JPEGs decoded at 1/2-1/8 size (Pillow float-box path) still frame the box."""
    from regionmed_fast.data import sample as sample_mod

    big = (210, 170, 530, 450)
    root = str(tmp_path / "big")
    recs = []
    for i in range(4):
        write_image(os.path.join(root, "images", f"g{i}.jpg"), 803, 641, box=big, seed=i)
        recs.append(record(f"g{i}.jpg", 803, 641, boxes=[big]))
    write_dataset(root, recs)
    asked = []
    real = sample_mod.decode_image

    def spy(data, **kw):
        asked.append(kw.get("min_size"))
        return real(data, **kw)

    monkeypatch.setattr(sample_mod, "decode_image", spy)
    for train in (False, True):
        dl = make_loader(root, image_size=64, batch_size=4, train=train, num_workers=0, seed=1,
                         backend="cpu")
        for _ in range(2 if train else 1):
            for batch in dl:
                assert _check_framed(batch) > 0
    assert asked and all(a is not None for a in asked)  # every decode was a reduced one
