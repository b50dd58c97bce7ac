"""Converters to the manifest format: ``regionmed-fast convert --from
coco|csv|triplets|chestxray14|vindr|rsna FILE --images DIR --out DIR``.

Inputs:
  coco      COCO detection JSON: ``images`` [{id, file_name, width?, height?}],
            ``annotations`` [{image_id, bbox [x, y, w, h], category_id}], ``categories``
            [{id, name}]; caption annotations ({image_id, caption}) in the same file or in
            ``--captions FILE`` become image texts.
  csv       one box per row with a header: ``image, x1, y1, x2, y2[, label][, text]``
            (``--box-format xywh`` reads x, y, w, h; ``--columns image=COL,x1=COL,...`` maps
            other headers, data/tables.py). A row with empty coordinates adds its label to the
            image without a region ("No Finding").
  chestxray14, vindr, rsna
            the published box tables (ChestX-ray14 ``BBox_List_2017.csv``, VinDr-CXR
            ``train.csv``, RSNA Pneumonia ``stage_2_train_labels.csv``): presets of the csv
            reader, checked against their headers (data/tables.py).
  triplets  (image, ROI box, description) as in MedTrinity-25M: JSONL lines
            ``{"image", "bbox", "text"|"caption"|"description", "label"?}`` or a CSV with
            columns ``image, x1, y1, x2, y2, text[, label]``.

Templates (documented, overridable with ``--region-template`` / ``--image-template``):
  region text = REGION_TEMPLATE.format(name=<category or label>)  default "{name}"
  image text (when the input has no caption/text) =
      IMAGE_TEMPLATE.format(findings=<names joined as "a, b and c">)
      default "medical image showing {findings}."; with no findings (or only a "No finding"
      label): NO_FINDING_TEXT.
  For triplets, the image text is the image's descriptions joined with spaces (in order).

Images: width/height are read from the files under ``--images``; image paths in the manifest
are relative to ``--out``. Problems in the input (missing image, reversed or empty box) are
reported with the input file and line/index and the item is skipped; boxes partly outside the
image are clipped. The output passes ``regionmed-fast validate``.
"""
from __future__ import annotations

import csv
import json
import math
import os
from collections import OrderedDict

from .manifest import ANNOTATIONS, image_size
from .tables import IMAGE_EXTS, PRESETS, Columns, from_table, parse_columns

REGION_TEMPLATE = "{name}"
IMAGE_TEMPLATE = "medical image showing {findings}."
NO_FINDING_TEXT = "medical image with no annotated finding."
NO_FINDING_LABELS = frozenset({"no finding", "no findings", "normal"})
KINDS = ("coco", "csv", "triplets", *PRESETS)


def join_names(names: list[str]) -> str:
    names = list(dict.fromkeys(n for n in names if n))
    if len(names) <= 1:
        return "".join(names)
    return ", ".join(names[:-1]) + " and " + names[-1]


class _Builder:
    """Collects records per image, reading sizes, clipping boxes and logging input problems."""

    def __init__(self, images_dir: str, out_dir: str, region_template: str, image_template: str):
        self.images_dir, self.out_dir = images_dir, out_dir
        self.region_template, self.image_template = region_template, image_template
        self.records: OrderedDict[str, dict] = OrderedDict()
        self.problems: list[str] = []
        self._sizes: dict[str, tuple[int, int] | None] = {}

    def _size(self, name: str, where: str) -> tuple[int, int] | None:
        if name not in self._sizes:
            path = os.path.join(self.images_dir, name)
            try:
                self._sizes[name] = image_size(path)
            except FileNotFoundError:
                self.problems.append(f"{where}: image not found: {path} (skipped)")
                self._sizes[name] = None
            except Exception as exc:
                self.problems.append(f"{where}: cannot read image {path}: {exc} (skipped)")
                self._sizes[name] = None
        return self._sizes[name]

    def image(self, name: str, where: str) -> dict | None:
        size = self._size(name, where)
        if size is None:
            return None
        if name not in self.records:
            rel = os.path.relpath(os.path.join(self.images_dir, name), self.out_dir)
            self.records[name] = {"image": rel, "width": size[0], "height": size[1], "text": "",
                                  "regions": [], "labels": [], "source": ""}
        return self.records[name]

    def region(self, rec: dict, box, label: str, text: str | None, where: str, **extra) -> None:
        try:
            x1, y1, x2, y2 = (float(v) for v in box)
        except (TypeError, ValueError):
            self.problems.append(f"{where}: bad box {box!r} (skipped)")
            return
        if not all(math.isfinite(v) for v in (x1, y1, x2, y2)) or x2 <= x1 or y2 <= y1:
            self.problems.append(f"{where}: box {box!r} is NaN, reversed or empty (skipped)")
            return
        w, h = rec["width"], rec["height"]
        c = [max(0.0, x1), max(0.0, y1), min(float(w), x2), min(float(h), y2)]
        if c[2] <= c[0] or c[3] <= c[1]:
            self.problems.append(f"{where}: box {box!r} outside the {w}x{h} image (skipped)")
            return
        if c != [x1, y1, x2, y2]:
            self.problems.append(f"{where}: box {box!r} clipped to the {w}x{h} image")
        rtext = text if text else self.region_template.format(name=label)
        rec["regions"].append({"bbox": c, "text": rtext, "label": label, **extra})
        if label and label not in rec["labels"]:
            rec["labels"].append(label)

    def finish(self, source: str) -> list[dict]:
        out = []
        for rec in self.records.values():
            if not rec["text"]:
                names = [n for n in rec["labels"] if n.lower() not in NO_FINDING_LABELS]
                rec["text"] = (self.image_template.format(findings=join_names(names))
                               if names else NO_FINDING_TEXT)
            rec["source"] = rec["source"] or source
            out.append(rec)
        return out


def from_coco(path: str, b: _Builder, captions: str | None = None) -> None:
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{path}: COCO file needs a list {key!r}")
    cats = {c["id"]: c["name"] for c in data.get("categories", [])}
    by_id: dict = {}
    for i, im in enumerate(data["images"]):
        rec = b.image(im["file_name"], f"{path}: images[{i}] ({im['file_name']})")
        if rec is not None:
            by_id[im["id"]] = rec
    caps: dict = {}
    anns = list(data["annotations"])
    if captions:
        with open(captions, encoding="utf-8") as fh:
            anns += [dict(a, _cap=True) for a in json.load(fh).get("annotations", [])]
    for i, ann in enumerate(anns):
        where = f"{path}: annotations[{i}]"
        rec = by_id.get(ann.get("image_id"))
        if rec is None:
            if ann.get("image_id") not in {im["id"] for im in data["images"]}:
                b.problems.append(f"{where}: unknown image_id {ann.get('image_id')!r} (skipped)")
            continue
        if "caption" in ann:
            caps.setdefault(ann["image_id"], []).append(str(ann["caption"]).strip())
            continue
        if "bbox" not in ann:
            continue
        x, y, w, h = ann["bbox"]
        name = cats.get(ann.get("category_id"), str(ann.get("category_id")))
        b.region(rec, [x, y, x + w, y + h], name, None, where)
    for image_id, texts in caps.items():
        by_id[image_id]["text"] = " ".join(t for t in texts if t)


def _box_from_row(row: dict, box_format: str):
    vals = [row.get(k, "") for k in (("x1", "y1", "x2", "y2") if box_format == "xyxy" else ("x", "y", "w", "h"))]
    if all(str(v).strip() == "" for v in vals):
        return None
    vals = [float(v) for v in vals]
    if box_format == "xywh":
        vals = [vals[0], vals[1], vals[0] + vals[2], vals[1] + vals[3]]
    return vals


def _csv_rows(path: str):
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or "image" not in [f.strip() for f in reader.fieldnames]:
            raise ValueError(f"{path}:1: CSV needs a header row with an 'image' column, got {reader.fieldnames}")
        for no, row in enumerate(reader, 2):
            yield no, {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}


def from_triplets(path: str, b: _Builder, box_format: str = "xyxy") -> None:
    texts: dict[str, list[str]] = {}
    if path.endswith(".csv"):
        items = []
        for no, row in _csv_rows(path):
            try:
                box = _box_from_row(row, box_format)
            except ValueError:
                box = "bad"
            items.append((f"{path}:{no}", row["image"], box, row.get("text", ""), row.get("label", "")))
    else:
        items = []
        with open(path, encoding="utf-8") as fh:
            for no, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                where = f"{path}:{no}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    b.problems.append(f"{where}: not valid JSON ({exc.msg}) (skipped)")
                    continue
                text = obj.get("text") or obj.get("caption") or obj.get("description") or ""
                box = obj.get("bbox")
                if box is not None and box_format == "xywh":
                    box = [box[0], box[1], box[0] + box[2], box[1] + box[3]]
                items.append((where, obj.get("image", ""), box, text, obj.get("label", "")))
    for where, image, box, text, label in items:
        if not image or not text:
            b.problems.append(f"{where}: needs 'image' and a description (skipped)")
            continue
        rec = b.image(image, where)
        if rec is None:
            continue
        texts.setdefault(image, []).append(text)
        if box is None:
            continue
        if box == "bad":
            b.problems.append(f"{where}: non-numeric box (skipped)")
            continue
        b.region(rec, box, label or text, text, where)
    for image, ts in texts.items():
        b.records[image]["text"] = " ".join(dict.fromkeys(t.strip() for t in ts))


def convert(kind: str, path: str, *, images: str, out: str, captions: str | None = None,
            box_format: str = "xyxy", region_template: str = REGION_TEMPLATE,
            image_template: str = IMAGE_TEMPLATE, columns: str | Columns | None = None,
            image_exts: tuple[str, ...] = IMAGE_EXTS) -> tuple[str, int, list[str]]:
    """Convert ``path`` of ``kind`` (:data:`KINDS`) into ``out/annotations.jsonl``.
    ``columns``: the csv column mapping (data/tables.py; a ``"key=COL,..."`` string or
    :class:`Columns`); ``image_exts``: tried for image names without an extension.
    Returns (manifest path, records written, problems found in the input)."""
    if kind not in KINDS:
        raise ValueError(f"--from must be one of {', '.join(KINDS)}, got {kind!r}")
    image_exts = tuple(e if e.startswith(".") else "." + e for e in image_exts)
    if columns is not None and kind != "csv":
        raise ValueError(f"--columns is for --from csv (--from {kind} knows its columns)")
    if box_format not in ("xyxy", "xywh"):
        raise ValueError(f"box format must be xyxy or xywh, got {box_format!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input file not found: {path}")
    if not os.path.isdir(images):
        raise FileNotFoundError(f"--images folder not found: {images}")
    os.makedirs(out, exist_ok=True)
    b = _Builder(images, out, region_template, image_template)
    if kind == "coco":
        from_coco(path, b, captions)
    elif kind == "csv":
        cols = (columns if isinstance(columns, Columns) else
                parse_columns(columns or "", box_format))
        from_table(path, b, cols, image_exts=image_exts)
    elif kind in PRESETS:
        from_table(path, b, PRESETS[kind], preset=kind, image_exts=image_exts)
    else:
        from_triplets(path, b, box_format)
    records = b.finish(f"converted from {kind} {os.path.basename(path)}")
    dest = os.path.join(out, ANNOTATIONS)
    if os.path.exists(dest) and os.path.samefile(dest, path):
        raise ValueError(f"refusing to overwrite the input {path}")
    with open(dest, "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return dest, len(records), b.problems


def convert_main(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="regionmed-fast convert", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from", dest="kind", required=True, choices=KINDS)
    ap.add_argument("file", help="input annotation file")
    ap.add_argument("--images", required=True, help="folder the input's image names are relative to")
    ap.add_argument("--out", required=True, help="output dataset folder (annotations.jsonl)")
    ap.add_argument("--captions", default=None, help="COCO captions JSON (coco only)")
    ap.add_argument("--box-format", default="xyxy", choices=("xyxy", "xywh"), help="csv/triplets boxes")
    ap.add_argument("--columns", default=None,
                    help="csv only: KEY=COLUMN,... (image, x1,y1,x2,y2 or x,y,w,h, label, text, "
                         "patient_id, other region fields; COLUMN a header name or #N)")
    ap.add_argument("--image-ext", action="append", default=None,
                    help="extension tried for image names without one (repeatable; default "
                         + " ".join(IMAGE_EXTS) + ")")
    ap.add_argument("--region-template", default=REGION_TEMPLATE)
    ap.add_argument("--image-template", default=IMAGE_TEMPLATE)
    args = ap.parse_args(argv)
    try:
        dest, n, problems = convert(args.kind, args.file, images=args.images, out=args.out,
                                    captions=args.captions, box_format=args.box_format,
                                    region_template=args.region_template,
                                    image_template=args.image_template, columns=args.columns,
                                    image_exts=tuple(args.image_ext or IMAGE_EXTS))
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f"error: {exc}")
        return 2
    for p in problems:
        print(p)
    print(f"wrote {dest}: {n} record(s), {len(problems)} input problem(s)")
    return 0 if n else 1
