"""Synthetic medical-looking phantoms: the embedded default dataset (no download needed).

Two modalities in style:

* ``chest_xray`` - a frontal radiograph: body outline, two lungs, mediastinum and heart, spine,
  ribs; findings ``nodule``, ``mass``, ``effusion``, ``calcification`` in the right/left and
  upper/middle/lower zones (radiological convention: the patient's right is the image's left).
* ``dermoscopy`` - skin texture, a dermatoscope vignette, hairs and a pigmented lesion with a
  pigment network; findings ``globule``, ``veil`` (blue-white veil), ``streaks``.

Every finding is drawn, then described: its region text ("a 6 mm calcified nodule in the right
upper zone") is built from the drawn kind, size and place, and the image text lists all findings,
so telling two images apart often needs the small lesions (a few pixels at 128 px). Each image is
drawn from its own seed (``seed``, index), so image ``i`` is the same whatever ``n`` is.

The folder follows docs/design.md section 5.1 (``images/*.png`` + ``annotations.jsonl``, plus a
``qa.jsonl`` of yes/no and location questions). Per region extra keys: ``kind``, ``location``,
``size_px`` (diameter or extent in pixels of the stored image), ``size_mm``, ``size_class``
(``small``/``medium``/``large`` by ``size_px / image side``: < 0.08, < 0.2, else); per image:
``modality``, ``split`` (``train``/``test``), ``seed``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

MODALITIES = ("chest_xray", "dermoscopy")
KINDS = {
    "chest_xray": ("nodule", "mass", "effusion", "calcification"),
    "dermoscopy": ("globule", "veil", "streaks"),
}
NORMAL = "normal"
# Field of view of the whole image in millimetres: sets the mm <-> pixel scale in the texts.
FOV_MM = {"chest_xray": 300.0, "dermoscopy": 20.0}
SMALL_FRACTION, MEDIUM_FRACTION = 0.08, 0.2
# Diameter (or extent) of each kind as a fraction of the image side: (low, high).
SIZE_RANGE = {
    "nodule": (0.022, 0.10), "calcification": (0.018, 0.045), "mass": (0.12, 0.24),
    "effusion": (0.10, 0.26), "globule": (0.025, 0.07), "veil": (0.10, 0.26),
    "streaks": (0.06, 0.16),
}
_KIND_WEIGHTS = {
    "chest_xray": (0.4, 0.2, 0.15, 0.25),
    "dermoscopy": (0.45, 0.3, 0.25),
}


def size_class(size_px: float, side: int) -> str:
    """``small`` / ``medium`` / ``large`` from a finding's extent relative to the image side."""
    f = size_px / side
    return "small" if f < SMALL_FRACTION else "medium" if f < MEDIUM_FRACTION else "large"


def class_prompt(label: str, modality: str) -> str:
    """A zero-shot prompt for ``label`` (a kind or ``normal``) in ``modality``'s wording."""
    if modality == "chest_xray":
        words = {"nodule": "a lung nodule", "mass": "a lung mass", "effusion": "a pleural effusion",
                 "calcification": "a calcified nodule", NORMAL: "no focal abnormality"}
        return f"a chest radiograph showing {words[label]}"
    if modality == "dermoscopy":
        words = {"globule": "a dark globule", "veil": "a blue-white veil",
                 "streaks": "radial streaks", NORMAL: "no dermoscopic structures"}
        return f"a dermoscopic image of a pigmented lesion with {words[label]}"
    raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")


@dataclass
class Finding:
    kind: str
    bbox: tuple[float, float, float, float]
    size_px: float
    location: str
    detail: str = ""

    def record(self, modality: str, side: int) -> dict:
        size_mm = self.size_px * FOV_MM[modality] / side
        return {
            "bbox": [round(v, 2) for v in self.bbox],
            "text": _region_text(self, modality, size_mm),
            "label": self.kind,
            "kind": self.kind,
            "location": self.location,
            "size_px": round(self.size_px, 2),
            "size_mm": round(size_mm, 1),
            "size_class": size_class(self.size_px, side),
        }


# ---------------------------------------------------------------- drawing primitives (float32)

@lru_cache(maxsize=8)
def _grid(side: int) -> tuple[np.ndarray, np.ndarray]:
    # pixel centres in image-fraction units, so shapes scale with the image size
    c = (np.arange(side, dtype=np.float32) + 0.5) / side
    return c[None, :].repeat(side, 0), c[:, None].repeat(side, 1)


def _ellipse(side: int, cx: float, cy: float, rx: float, ry: float, soft: float = 1.0,
             angle: float = 0.0, wobble: np.ndarray | None = None) -> np.ndarray:
    """Soft-edged (about ``soft`` pixels) filled ellipse as a [side, side] mask in [0, 1]."""
    r = _ellipse_radius(side, cx, cy, rx, ry, angle, wobble)
    return _soft_inside(r, side, min(rx, ry), soft)


def _soft_inside(r: np.ndarray, side: int, radius: float, soft: float) -> np.ndarray:
    edge_frac = soft / (side * max(radius, 1e-6))
    return np.clip((1.0 - r) / edge_frac + 0.5, 0.0, 1.0).astype(np.float32)


def _ellipse_radius(side: int, cx: float, cy: float, rx: float, ry: float, angle: float = 0.0,
                    wobble: np.ndarray | None = None) -> np.ndarray:
    """Normalised radius field of an (irregular) ellipse: < 1 inside, 1 on the border."""
    x, y = _grid(side)
    dx, dy = x - cx, y - cy
    if angle:
        ca, sa = math.cos(angle), math.sin(angle)
        dx, dy = ca * dx + sa * dy, -sa * dx + ca * dy
    r = np.sqrt((dx / rx) ** 2 + (dy / ry) ** 2)
    if wobble is not None:  # irregular border: radius modulated by a few angular harmonics
        th = np.arctan2(dy, dx)
        mod = 1.0 + sum(a * np.cos((k + 2) * th + p) for k, (a, p) in enumerate(wobble))
        r = r / mod
    return r


def _smooth_noise(side: int, cells: int, rng: np.random.Generator) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a cells x cells random grid, bilinearly upsampled."""
    g = rng.uniform(-1, 1, (cells + 1, cells + 1)).astype(np.float32)
    t = np.linspace(0, cells, side, dtype=np.float32)
    i = np.minimum(t.astype(np.int64), cells - 1)
    f = t - i
    rows = g[i] * (1 - f)[:, None] + g[i + 1] * f[:, None]
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


def _bbox_of(mask: np.ndarray, thresh: float = 0.3) -> tuple[float, float, float, float] | None:
    ys, xs = np.nonzero(mask > thresh)
    if len(xs) == 0:
        return None
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def _overlaps(box, boxes, margin: float) -> bool:
    return any(box[0] < b[2] + margin and b[0] < box[2] + margin and
               box[1] < b[3] + margin and b[1] < box[3] + margin for b in boxes)


# ---------------------------------------------------------------- chest radiograph

def _chest(side: int, rng: np.random.Generator) -> tuple[np.ndarray, list[Finding]]:
    x, y = _grid(side)
    img = np.full((side, side), 0.04, np.float32)
    body = _ellipse(side, 0.5, 0.58, rng.uniform(0.42, 0.47), rng.uniform(0.55, 0.62), soft=3)
    img += 0.5 * body
    # lungs: patient's right lung is on the image's left
    lungs = {}
    for name, cx in (("right", 0.31), ("left", 0.69)):
        cx = cx + rng.uniform(-0.02, 0.02)
        cy, rx, ry = rng.uniform(0.43, 0.47), rng.uniform(0.15, 0.18), rng.uniform(0.27, 0.31)
        m = _ellipse(side, cx, cy, rx, ry, soft=2, angle=rng.uniform(-0.08, 0.08))
        lungs[name] = (m, cx, cy, rx, ry)
        img -= 0.33 * m * (0.85 + 0.15 * (y - cy) / ry)  # lung bases a touch denser
    lung_any = np.maximum(lungs["right"][0], lungs["left"][0])
    # ribs: faint curved bands inside the lungs
    for k in range(9):
        y0 = 0.18 + k * 0.065 + rng.uniform(-0.01, 0.01)
        curve = y0 + 0.35 * (x - 0.5) ** 2 - 0.04 * np.abs(x - 0.5)
        band = np.clip(1.0 - np.abs(y - curve) * side / (0.012 * side + 1.0), 0, 1)
        img += 0.07 * band * lung_any
    heart = _ellipse(side, rng.uniform(0.53, 0.57), rng.uniform(0.62, 0.66),
                     rng.uniform(0.12, 0.15), rng.uniform(0.12, 0.15), soft=2)
    medi = _ellipse(side, 0.5, 0.4, 0.065, 0.3, soft=2)
    img += 0.28 * np.maximum(heart, medi) * body
    img += 0.12 * np.clip(1 - np.abs(x - 0.5) / 0.03, 0, 1) * body  # spine
    img += 0.04 * _smooth_noise(side, 6, rng) * body

    findings: list[Finding] = []
    n = 0 if rng.random() < 0.15 else int(rng.integers(1, 4))
    kinds = rng.choice(KINDS["chest_xray"], size=n, p=_KIND_WEIGHTS["chest_xray"])
    boxes: list[tuple] = []
    effusion_sides: set[str] = set()
    for kind in kinds:
        for _ in range(20):  # rejection: inside a lung, not on top of another finding
            f = _chest_finding(str(kind), side, lungs, rng, effusion_sides)
            if f is None:
                continue
            finding, mask, amp = f
            if _overlaps(finding.bbox, boxes, margin=1.0):
                continue
            img = img * (1 - mask) + np.maximum(img, amp) * mask if kind == "effusion" \
                else img + amp * mask
            boxes.append(finding.bbox)
            findings.append(finding)
            break
    # exposure and detector noise
    img = img * rng.uniform(0.85, 1.15) + rng.uniform(-0.04, 0.04)
    img += rng.normal(0, 0.015, img.shape).astype(np.float32)
    return np.clip(img, 0, 1), findings


def _chest_zone(name: str, cy: float, ry: float, py: float) -> str:
    t = (py - (cy - ry)) / (2 * ry)
    zone = "upper" if t < 1 / 3 else "middle" if t < 2 / 3 else "lower"
    return f"{name} {zone} zone"


def _chest_finding(kind, side, lungs, rng, effusion_sides):
    name = "right" if rng.random() < 0.5 else "left"
    m, cx, cy, rx, ry = lungs[name]
    lo, hi = SIZE_RANGE[kind]
    d = rng.uniform(lo, hi)  # diameter in image fractions
    if kind == "effusion":
        if name in effusion_sides:
            return None
        x, y = _grid(side)
        level = cy + ry - d
        tilt = 0.5 * (x - cx) * (1 if name == "left" else -1)  # meniscus rises laterally
        fluid = np.clip((y - level + tilt * d) * side / 2.0 + 0.5, 0, 1) * m
        bbox = _bbox_of(fluid)
        if bbox is None or bbox[3] - bbox[1] < 2:
            return None
        effusion_sides.add(name)
        ext = bbox[3] - bbox[1]
        return Finding(kind, bbox, ext, f"{name} lower zone",
                       detail=("small" if d < 0.15 else "moderate" if d < 0.21 else "large")), \
            fluid, np.float32(0.62)
    r = d / 2
    # centre well inside the lung so the lesion reads as intrapulmonary
    for _ in range(10):
        px, py = rng.uniform(cx - rx, cx + rx), rng.uniform(cy - ry, cy + ry)
        if ((px - cx) / (rx - r)) ** 2 + ((py - cy) / (ry - r)) ** 2 < 0.8:
            break
    else:
        return None
    soft = 1.0
    if kind == "mass":
        wob = [(rng.uniform(0.04, 0.12), rng.uniform(0, 6.3)) for _ in range(3)]
        mask = _ellipse(side, px, py, r, r * rng.uniform(0.8, 1.0), soft=2, wobble=wob,
                        angle=rng.uniform(0, 3.1))
        mask *= 0.85 + 0.15 * _smooth_noise(side, 12, rng)
        amp = rng.uniform(0.28, 0.38)
    elif kind == "calcification":
        mask = _ellipse(side, px, py, r, r, soft=0.6)
        amp = rng.uniform(0.55, 0.7)
    else:  # nodule: soft-edged round opacity
        mask = _ellipse(side, px, py, r, r, soft=soft + 0.5)
        amp = rng.uniform(0.25, 0.35)
    bbox = _bbox_of(mask)
    if bbox is None:
        return None
    size_px = d * side
    return Finding(kind, bbox, size_px, _chest_zone(name, cy, ry, py)), mask, np.float32(amp)


# ---------------------------------------------------------------- dermoscopy

def _quadrant(px: float, py: float, cx: float, cy: float, r: float) -> str:
    dx, dy = px - cx, py - cy
    if math.hypot(dx, dy) < 0.35 * r:
        return "centre"
    return f"{'upper' if dy < 0 else 'lower'} {'left' if dx < 0 else 'right'}"


def _derm(side: int, rng: np.random.Generator) -> tuple[np.ndarray, list[Finding]]:
    x, y = _grid(side)
    skin = np.array([rng.uniform(0.8, 0.92), rng.uniform(0.6, 0.72), rng.uniform(0.5, 0.62)],
                    np.float32)
    tex = 0.05 * _smooth_noise(side, 8, rng) + 0.02 * _smooth_noise(side, 32, rng)
    img = skin[None, None, :] * (1 + tex[..., None])
    # the nevus: irregular brown ellipse with a pigment network
    cx, cy = rng.uniform(0.42, 0.58), rng.uniform(0.42, 0.58)
    R = rng.uniform(0.2, 0.3)
    wob = [(rng.uniform(0.02, 0.08), rng.uniform(0, 6.3)) for _ in range(3)]
    ry = R * rng.uniform(0.75, 1.0)
    lesion_r = _ellipse_radius(side, cx, cy, R, ry, angle=rng.uniform(0, 3.1), wobble=wob)
    lesion = _soft_inside(lesion_r, side, ry, soft=3)
    period = rng.uniform(0.035, 0.05)
    net = 0.5 + 0.5 * np.sin(2 * np.pi * x / period) * np.sin(2 * np.pi * y / period)
    brown = np.array([0.45, 0.28, 0.18], np.float32) * rng.uniform(0.85, 1.1)
    core = _ellipse(side, cx, cy, 0.6 * R, 0.6 * R, soft=4)
    pigment = (brown[None, None, :] * (1 - 0.25 * net[..., None]) * (1 - 0.2 * core[..., None]))
    img = img * (1 - lesion[..., None]) + pigment * lesion[..., None]

    findings: list[Finding] = []
    n = 0 if rng.random() < 0.15 else int(rng.integers(1, 4))
    kinds = rng.choice(KINDS["dermoscopy"], size=n, p=_KIND_WEIGHTS["dermoscopy"])
    boxes: list[tuple] = []
    for kind in kinds:
        for _ in range(20):
            f = _derm_finding(str(kind), side, cx, cy, R, lesion_r, rng)
            if f is None:
                continue
            finding, mask, colour, alpha = f
            if _overlaps(finding.bbox, boxes, margin=1.0):
                continue
            a = (alpha * mask)[..., None]
            img = img * (1 - a) + colour[None, None, :] * a
            boxes.append(finding.bbox)
            findings.append(finding)
            break
    # hairs: thin dark arcs across the field (drawn last, like real hair over the lesion)
    for _ in range(int(rng.integers(0, 4))):
        a0, b0 = rng.uniform(-1, 1), rng.uniform(0.1, 0.9)
        curve = b0 + a0 * (x - 0.5) + rng.uniform(-0.6, 0.6) * (x - 0.5) ** 2
        hair = np.clip(1.0 - np.abs(y - curve) * side / 0.8, 0, 1)
        img = img * (1 - 0.7 * hair[..., None]) + 0.12 * 0.7 * hair[..., None]
    # dermatoscope: dark corners outside the lens circle
    vign = _ellipse(side, 0.5, 0.5, 0.56, 0.56, soft=side * 0.06)
    img = img * (0.1 + 0.9 * vign[..., None])
    img += rng.normal(0, 0.012, img.shape).astype(np.float32)
    return np.clip(img, 0, 1), findings


def _derm_finding(kind, side, cx, cy, R, lesion_r, rng):
    lo, hi = SIZE_RANGE[kind]
    d = rng.uniform(lo, hi)
    ang = rng.uniform(0, 2 * np.pi)
    if kind == "streaks":
        # radial lines at the lesion border within an angular sector of extent ~d
        x, y = _grid(side)
        dx, dy = x - cx, y - cy
        rad = np.sqrt(dx * dx + dy * dy)
        th = np.arctan2(dy, dx)
        half = d / (2 * R)
        dth = np.angle(np.exp(1j * (th - ang)))
        lines = np.abs(np.sin(dth * rng.uniform(40, 60))) < 0.35
        # from just inside the lesion's own (irregular) border outwards
        mask = ((np.abs(dth) < half) & lines &
                (lesion_r > 0.88) & (lesion_r < 0.88 + d / R)).astype(np.float32)
        bbox = _bbox_of(mask)
        if bbox is None:
            return None
        size_px = max(bbox[2] - bbox[0], bbox[3] - bbox[1])
        px, py = cx + (R + d / 2) * math.cos(ang), cy + (R + d / 2) * math.sin(ang)
        return (Finding(kind, bbox, size_px, _quadrant(px, py, cx, cy, R)), mask,
                np.array([0.16, 0.09, 0.06], np.float32), 0.9)
    r = d / 2
    dist = rng.uniform(0, max(R - r, 0.0) * 0.9)
    px, py = cx + dist * math.cos(ang), cy + dist * math.sin(ang)
    ix, iy = min(int(px * side), side - 1), min(int(py * side), side - 1)
    if not 0 <= ix < side or not 0 <= iy < side or lesion_r[iy, ix] > 0.8:
        return None  # keep the structure inside the lesion
    if kind == "globule":
        mask = _ellipse(side, px, py, r, r, soft=0.7)
        # near-black: a globule must stand out from the dark-brown lesion it sits on
        colour, alpha = np.array([0.03, 0.015, 0.01], np.float32), 1.0
    else:  # blue-white veil: irregular, semi-transparent
        wob = [(rng.uniform(0.05, 0.15), rng.uniform(0, 6.3)) for _ in range(3)]
        mask = _ellipse(side, px, py, r, r * rng.uniform(0.7, 1.0), soft=2, wobble=wob)
        mask *= 0.8 + 0.2 * _smooth_noise(side, 10, rng)
        colour, alpha = np.array([0.55, 0.62, 0.78], np.float32), 0.75
    bbox = _bbox_of(mask)
    if bbox is None:
        return None
    return Finding(kind, bbox, d * side, _quadrant(px, py, cx, cy, R)), mask, colour, alpha


# ---------------------------------------------------------------- texts

def _fmt_mm(mm: float) -> str:
    return f"{mm:.0f}" if mm >= 3 else f"{mm:.1f}"


def _a(mm: str) -> str:
    # "an 8 mm", "an 11 mm", "an 18 mm" - the article follows the spoken number
    return "an" if mm.startswith("8") or mm.split(".")[0] in ("11", "18") else "a"


def _region_text(f: Finding, modality: str, size_mm: float) -> str:
    mm = _fmt_mm(size_mm)
    a = _a(mm)
    if f.kind == "effusion":
        side = f.location.split()[0]
        return f"a {f.detail} {side} pleural effusion"
    if modality == "chest_xray":
        noun = {"nodule": "nodule", "mass": "mass", "calcification": "calcified nodule"}[f.kind]
        return f"{a} {mm} mm {noun} in the {f.location}"
    where = "in the centre of the lesion" if f.location == "centre" \
        else f"at the {f.location} of the lesion"
    if f.kind == "globule":
        return f"{a} {mm} mm dark globule {where}"
    if f.kind == "veil":
        return f"{a} {mm} mm blue-white veil {where}"
    return f"radial streaks {where}"


_CHEST_OPEN = ("Frontal chest radiograph", "PA chest radiograph", "Chest X-ray")
_DERM_OPEN = ("Dermoscopic image of a pigmented skin lesion", "Dermoscopy of a melanocytic lesion")


def _image_text(modality: str, regions: list[dict], rng: np.random.Generator) -> str:
    opener = (_CHEST_OPEN if modality == "chest_xray" else _DERM_OPEN)[int(rng.integers(0, 2 + (modality == "chest_xray")))]
    if not regions:
        tail = "clear lungs, no focal abnormality" if modality == "chest_xray" \
            else "a regular pigment network and no dermoscopic structures"
        return f"{opener} with {tail}."
    parts = [r["text"] for r in regions]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{opener} showing {listed}."


def _qa(image: str, modality: str, regions: list[dict], rng: np.random.Generator) -> list[dict]:
    present = {r["kind"] for r in regions}
    kind = str(rng.choice(KINDS[modality]))
    noun = {"calcification": "calcified nodule", "veil": "blue-white veil",
            "streaks": "streak", "globule": "dark globule"}.get(kind, kind)
    out = [{"image": image, "question": f"Is there a {noun}?",
            "answer": "yes" if kind in present else "no"}]
    if regions:
        r = regions[int(rng.integers(0, len(regions)))]
        q = "Where is the {}?".format({"calcification": "calcified nodule",
                                       "veil": "blue-white veil"}.get(r["kind"], r["kind"]))
        out.append({"image": image, "question": q, "answer": r["location"]})
    return out


# ---------------------------------------------------------------- dataset

def make_example(index: int, size: int = 128, seed: int = 0,
                 modality: str | None = None) -> tuple[np.ndarray, dict]:
    """Draw phantom ``index`` of dataset ``seed``: (uint8 image [size, size, 3], record).

    The record is a docs/design.md section 5.1 manifest line without the ``image`` key.
    """
    if size < 32:
        raise ValueError(f"size must be >= 32 pixels, got {size}")
    rng = np.random.default_rng([seed, index])
    if modality is None:
        modality = MODALITIES[int(rng.random() < 0.45)]
    elif modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    if modality == "chest_xray":
        gray, findings = _chest(size, rng)
        rgb = np.repeat(gray[..., None], 3, axis=2)
    else:
        rgb, findings = _derm(size, rng)
    findings.sort(key=lambda f: (f.bbox[1], f.bbox[0]))
    regions = [f.record(modality, size) for f in findings]
    labels = sorted({r["label"] for r in regions}) or [NORMAL]
    rec = {
        "width": size, "height": size,
        "text": _image_text(modality, regions, rng),
        "regions": regions,
        "labels": labels,
        "source": "regionmed_fast synthetic phantom",
        "modality": modality,
        "seed": [seed, index],
    }
    return (rgb * 255.0 + 0.5).astype(np.uint8), rec


def write_dataset(out_dir: str | os.PathLike, n: int = 2000, size: int = 128, seed: int = 0,
                  split_fraction: float = 0.2, *, qa: bool = True, verbose: bool = False) -> str:
    """Write ``n`` phantoms to ``out_dir`` (``images/NNNNNN.png``, ``annotations.jsonl``,
    ``qa.jsonl``). ``split_fraction`` of the images (chosen by their own seed) get
    ``"split": "test"``, the rest ``"train"``. Returns the path of ``annotations.jsonl``."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0.0 <= split_fraction < 1.0:
        raise ValueError(f"split_fraction must be in [0, 1), got {split_fraction}")
    out = os.fspath(out_dir)
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    t0 = time.perf_counter()
    ann_tmp = os.path.join(out, "annotations.jsonl.tmp")
    qa_tmp = os.path.join(out, "qa.jsonl.tmp")
    width = max(6, len(str(n - 1)))
    with open(ann_tmp, "w") as fa, open(qa_tmp, "w") as fq:
        for i in range(n):
            img, rec = make_example(i, size, seed)
            split_rng = np.random.default_rng([seed, i, 1])
            name = f"images/{i:0{width}d}.png"
            Image.fromarray(img).save(os.path.join(out, name), compress_level=1)
            rec = {"image": name, **rec, "split": "test" if split_rng.random() < split_fraction
                   else "train"}
            fa.write(json.dumps(rec) + "\n")
            if qa:
                for q in _qa(name, rec["modality"], rec["regions"], split_rng):
                    fq.write(json.dumps(q) + "\n")
            if verbose and (i + 1) % 500 == 0:
                print(f"  synth: {i + 1}/{n} images ({time.perf_counter() - t0:.1f} s)",
                      flush=True)
    os.replace(ann_tmp, os.path.join(out, "annotations.jsonl"))
    if qa:
        os.replace(qa_tmp, os.path.join(out, "qa.jsonl"))
    else:
        os.remove(qa_tmp)
    return os.path.join(out, "annotations.jsonl")


def cli_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="regionmed-fast synth", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--n", type=int, default=2000, help="number of images (default 2000)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-fraction", type=float, default=0.2,
                   help="fraction of images marked split=test (default 0.2)")
    p.add_argument("--no-qa", action="store_true", help="do not write qa.jsonl")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        path = write_dataset(a.out, a.n, a.size, a.seed, a.test_fraction, qa=not a.no_qa,
                             verbose=True)
    except ValueError as e:
        print(f"regionmed-fast synth: {e}", file=sys.stderr)
        return 2
    print(f"wrote {a.n} images ({a.size} px) and {path} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))
