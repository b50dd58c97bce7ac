"""Box tables (one box per CSV row) read by a column mapping, and presets for the published files.

A :class:`Columns` mapping says which column holds each field: ``image``; the box as ``x1, y1,
x2, y2`` or ``x, y, w, h`` (pixels); optionally ``label``, ``text``, ``patient_id`` (a record
field: the split rule's group, data/split.py) and any other name, kept as a field of each
region (VinDr's ``rad_id``). A column is a header name or ``#N`` (0-based position: for headers
whose names contain commas or repeat). On the command line: ``--columns
image=patientId,x=x,y=y,w=width,h=height`` (``regionmed-fast convert --from csv``).

Presets (``--from NAME``), each checked against its file's header:

* ``chestxray14``: NIH ChestX-ray14 ``BBox_List_2017.csv``, header ``Image Index,Finding
  Label,Bbox [x,y,w,h],,,`` (the unquoted header splits into ``Bbox [x``, ``y``, ``w``, ``h]``
  and three empty names, so the box is read by position, ``#2-#5``, x y w h). ``patient_id`` is
  the image name's part before ``_`` (``00013118_008.png`` -> ``00013118``), so a split never
  puts one patient's films on both sides.
* ``vindr``: VinDr-CXR ``train.csv``, ``image_id,class_name,class_id,rad_id,x_min,y_min,x_max,
  y_max``. Several radiologists read each image: each row's box is its own region, with the
  reader in the region's ``rad_id``; "No finding" rows (empty coordinates) add the label only.
* ``rsna``: RSNA Pneumonia ``stage_2_train_labels.csv``, ``patientId,x,y,width,height,Target``;
  ``Target`` 1 is a box labelled "lung opacity", 0 a film without finding; ``patient_id`` is
  ``patientId``.

VinDr and RSNA name images without an extension: the image is the first of ``image_exts``
(``.png``, ``.jpg``, ``.jpeg`` by default; ``--image-ext``) that exists under ``--images``
(the published DICOMs are converted to PNG/JPEG first).
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field

BOX_KEYS = {"xyxy": ("x1", "y1", "x2", "y2"), "xywh": ("x", "y", "w", "h")}
RECORD_KEYS = ("image", "label", "text", "patient_id")
IMAGE_EXTS = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class Columns:
    """Which column holds each field (a header name or ``#N``); see the module docstring.

    ``label_values``: raw label -> label ("" = no label: the row is a film without finding);
    ``patient_from_image``: patient id = the image name's part before this separator."""

    image: str = "image"
    box: tuple[str, str, str, str] = BOX_KEYS["xyxy"]
    box_format: str = "xyxy"
    label: str | None = "label"
    text: str | None = "text"
    patient_id: str | None = None
    region_fields: dict[str, str] = field(default_factory=dict)
    label_values: dict[str, str] | None = None
    patient_from_image: str | None = None
    header: tuple[str, ...] | None = None  # a preset's expected first header names


PRESETS: dict[str, Columns] = {
    "chestxray14": Columns(image="#0", label="#1", box=("#2", "#3", "#4", "#5"), box_format="xywh",
                           text=None, patient_from_image="_",
                           header=("Image Index", "Finding Label", "Bbox [x")),
    "vindr": Columns(image="image_id", label="class_name", text=None,
                     box=("x_min", "y_min", "x_max", "y_max"), region_fields={"rad_id": "rad_id"},
                     header=("image_id", "class_name", "class_id", "rad_id", "x_min", "y_min",
                             "x_max", "y_max")),
    "rsna": Columns(image="patientId", label="Target", text=None, patient_id="patientId",
                    box=("x", "y", "width", "height"), box_format="xywh",
                    label_values={"1": "lung opacity", "0": ""},
                    header=("patientId", "x", "y", "width", "height", "Target")),
}


def parse_columns(text: str, box_format: str = "xyxy") -> Columns:
    """``"image=Image Index,label=#1,x=#2,y=#3,w=#4,h=#5"`` -> :class:`Columns`. Box keys are
    x1/y1/x2/y2 or x/y/w/h (which set the box format); unnamed fields keep their defaults
    (``image``, ``label``, ``text``, ``x1``...: the plain CSV layout)."""
    pairs = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, col = part.partition("=")
        if not sep or not key.strip() or not col.strip():
            raise ValueError(f"--columns: {part!r} is not KEY=COLUMN")
        pairs[key.strip()] = col.strip()
    given = {f for f, keys in BOX_KEYS.items() if set(keys) & set(pairs)}
    if len(given) > 1:
        raise ValueError("--columns: give the box as x1,y1,x2,y2 or as x,y,w,h, not both")
    fmt = given.pop() if given else box_format
    keys = BOX_KEYS[fmt]
    box = tuple(pairs.pop(k, k) for k in keys)
    rec = {k: pairs.pop(k) for k in RECORD_KEYS if k in pairs}
    return Columns(box=box, box_format=fmt, region_fields=pairs, **rec)


class _Header:
    """Column lookup of one table: name or ``#N`` -> position, with a file:1 error when absent."""

    def __init__(self, path: str, names: list[str]):
        self.path, self.names = path, [n.strip() for n in names]

    def pos(self, col: str, role: str) -> int:
        if col.startswith("#") and col[1:].isdigit():
            i = int(col[1:])
            if i >= len(self.names):
                raise ValueError(f"{self.path}:1: {role} column {col} is past the header's "
                                 f"{len(self.names)} columns")
            return i
        if col not in self.names:
            raise ValueError(f"{self.path}:1: no {role} column {col!r} in the header "
                             f"{','.join(self.names)}; {suggest(self.names)}")
        return self.names.index(col)


def suggest(names: list[str]) -> str:
    """What to pass for a header: the preset it is, else --columns."""
    for name, cols in PRESETS.items():
        if tuple(n.strip() for n in names[:len(cols.header)]) == cols.header:
            return f"it looks like the {name} format: use --from {name}"
    return "name the columns with --columns image=COL,x1=COL,... (docs/data.md, Converters)"


def check_header(path: str, names: list[str], cols: Columns, preset: str) -> None:
    got = tuple(n.strip() for n in names[:len(cols.header)])
    if got != cols.header:
        raise ValueError(f"{path}:1: --from {preset} expects a header starting "
                         f"{','.join(cols.header)}, got {','.join(names)}; {suggest(names)}")


def resolve_image(images_dir: str, name: str, exts, seen: dict) -> str:
    """``name`` itself when it has an extension, else the first ``name + ext`` that exists."""
    if name in seen:
        return seen[name]
    out = name
    if not os.path.splitext(name)[1]:
        out = next((name + e for e in exts if os.path.isfile(os.path.join(images_dir, name + e))),
                   name + exts[0])
    seen[name] = out
    return out


def from_table(path: str, b, cols: Columns, *, preset: str | None = None,
               image_exts=IMAGE_EXTS) -> None:
    """Read a box table into the converter's builder ``b`` (data/convert.py)."""
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        names = next(reader, None)
        if names is None:
            raise ValueError(f"{path}:1: empty file (a header row is needed)")
        if preset is not None:
            check_header(path, names, cols, preset)
        h = _Header(path, names)
        at = {"image": h.pos(cols.image, "image")}
        for key in ("label", "text", "patient_id"):
            col = getattr(cols, key)
            # the plain layout's default label/text columns are optional; named ones are not
            if col is not None and (col != key or col in h.names or preset is not None):
                at[key] = h.pos(col, key)
        box = [h.pos(c, k) for c, k in zip(cols.box, BOX_KEYS[cols.box_format])]
        extra = {k: h.pos(c, k) for k, c in cols.region_fields.items()}
        seen: dict[str, str] = {}
        for row in reader:
            if not any(v.strip() for v in row):
                continue
            where = f"{path}:{reader.line_num}"
            cell = lambda i: row[i].strip() if i < len(row) else ""  # noqa: E731
            _row(b, where, cols, {k: cell(i) for k, i in at.items()}, [cell(i) for i in box],
                 {k: cell(i) for k, i in extra.items()},
                 lambda n: resolve_image(b.images_dir, n, image_exts, seen))


def _row(b, where, cols: Columns, f: dict, box: list[str], extra: dict, resolve) -> None:
    if not f["image"]:
        b.problems.append(f"{where}: empty image name (skipped)")
        return
    rec = b.image(resolve(f["image"]), where)
    if rec is None:
        return
    pid = f.get("patient_id") or (f["image"].split(cols.patient_from_image)[0]
                                  if cols.patient_from_image else "")
    if pid:
        rec["patient_id"] = pid
    label = f.get("label", "")
    if cols.label_values is not None:
        if label not in cols.label_values:
            b.problems.append(f"{where}: unknown label value {label!r}, expected one of "
                              f"{sorted(cols.label_values)} (skipped)")
            return
        label = cols.label_values[label]
    if all(v == "" for v in box):
        if label and label not in rec["labels"]:
            rec["labels"].append(label)  # a film read without a box ("No Finding")
        return
    try:
        x1, y1, a, c = (float(v) for v in box)
    except ValueError:
        b.problems.append(f"{where}: non-numeric box {box} (skipped)")
        return
    xyxy = [x1, y1, a, c] if cols.box_format == "xyxy" else [x1, y1, x1 + a, y1 + c]
    b.region(rec, xyxy, label, f.get("text") or None, where,
             **{k: v for k, v in extra.items() if v != ""})
