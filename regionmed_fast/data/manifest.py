"""Read and validate dataset manifests (docs/design.md section 5.1).

A dataset is a folder with ``annotations.jsonl`` (one JSON object per image) and the images it
names. Every problem is a :class:`Problem` naming the file and the 1-based line at fault.

Rules (the same for ``regionmed-fast validate`` and for loading):

* record errors (the record cannot be used): line is not JSON or not an object; a required field
  is missing or has the wrong type; the image is missing or unreadable; ``width``/``height`` do
  not match the image file; a box that is NaN/inf, reversed (x2 < x1 or y2 < y1), of zero area,
  or entirely outside the image.
* warnings (a defined result): a box partly outside the image is clipped to it; a record with no
  regions or with an empty text is kept.

Loading raises :class:`ManifestError` on the first record error, unless ``skip_bad=True``: then
bad records are skipped and counted (``ManifestReport.skipped``).
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

from regionmed_fast.errors import UserError

log = logging.getLogger("regionmed_fast.data")

ANNOTATIONS = "annotations.jsonl"
QA = "qa.jsonl"

# Problem kinds; tests and `validate --fix` key on these names.
BAD_JSON = "bad_json"
MISSING_FIELD = "missing_field"
BAD_FIELD = "bad_field"
MISSING_IMAGE = "missing_image"
UNREADABLE_IMAGE = "unreadable_image"
SIZE_MISMATCH = "size_mismatch"
NAN_BOX = "nan_box"
REVERSED_BOX = "reversed_box"
ZERO_AREA_BOX = "zero_area_box"
OUTSIDE_BOX = "outside_box"        # entirely outside: error
CLIPPED_BOX = "clipped_box"        # partly outside: warning, clipped
NO_REGIONS = "no_regions"          # warning
EMPTY_TEXT = "empty_text"          # warning

WARNING_KINDS = frozenset({CLIPPED_BOX, NO_REGIONS, EMPTY_TEXT})
# Box problems that drop just the region under `validate --fix` (the rest of the record is fine).
REGION_KINDS = frozenset({NAN_BOX, REVERSED_BOX, ZERO_AREA_BOX, OUTSIDE_BOX})

REQUIRED = {"image": str, "width": int, "height": int, "text": str, "regions": list}
REGION_REQUIRED = {"bbox": list, "text": str}


@dataclass
class Problem:
    """One problem in a manifest: ``file:line: kind: message``."""

    file: str
    line: int
    kind: str
    message: str
    region: int | None = None  # index of the region at fault, for box problems

    @property
    def is_error(self) -> bool:
        return self.kind not in WARNING_KINDS

    def __str__(self) -> str:
        where = f" region {self.region}" if self.region is not None else ""
        sev = "error" if self.is_error else "warning"
        return f"{self.file}:{self.line}: {sev}: {self.kind}{where}: {self.message}"


class ManifestError(UserError, ValueError):
    """A manifest record that cannot be used; ``str()`` starts with ``file:line``."""

    def __init__(self, problem: Problem):
        super().__init__(str(problem))
        self.problem = problem

    def __reduce__(self):  # the same error again after crossing a worker process boundary
        return type(self), (self.problem,)


class DataError(UserError, ValueError):
    """A dataset or loader argument that cannot be used (the message names it)."""


@dataclass
class ManifestReport:
    """What reading a manifest found: kept records, problems, and how many records were skipped."""

    records: list[dict] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    skipped: int = 0
    lines: int = 0

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.is_error]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if not p.is_error]


def image_size(path: str, full_decode: bool = False) -> tuple[int, int]:
    """(width, height) of an image file; ``full_decode`` also decodes the pixels, catching
    truncated or corrupt files that a header read misses. Raises OSError/ValueError."""
    from PIL import Image

    with Image.open(path) as im:
        size = im.size
        if full_decode:
            im.load()
    return int(size[0]), int(size[1])


def _type_name(t: type) -> str:
    return {str: "a string", int: "an integer", list: "a list"}.get(t, t.__name__)


def check_record(obj: Any, root: str, file: str, line: int, *, images: str = "header") -> tuple[dict | None, list[Problem]]:
    """Check one parsed manifest line.

    ``images``: "full" decodes each image (validate), "header" reads its size (loading),
    "exists" only checks that the file is there, "none" skips image checks (shards).
    Returns ``(record, problems)``; ``record`` is None when there is a record error, otherwise a
    normalised copy (boxes as float lists clipped to the image, ``labels`` a list, regions'
    ``label`` filled, ``image_path`` absolute).
    """
    probs: list[Problem] = []

    def err(kind: str, msg: str, region: int | None = None) -> None:
        probs.append(Problem(file, line, kind, msg, region))

    if not isinstance(obj, dict):
        err(BAD_JSON, f"expected a JSON object, got {type(obj).__name__}")
        return None, probs
    for key, typ in REQUIRED.items():
        if key not in obj:
            err(MISSING_FIELD, f"missing required field {key!r}")
        elif not isinstance(obj[key], typ) or (typ is int and isinstance(obj[key], bool)):
            err(BAD_FIELD, f"field {key!r} must be {_type_name(typ)}, got {obj[key]!r:.60}")
    if probs:
        return None, probs
    w, h = obj["width"], obj["height"]
    if w <= 0 or h <= 0:
        err(BAD_FIELD, f"width/height must be positive, got {w}x{h}")
        return None, probs
    labels = obj.get("labels", [])
    if isinstance(labels, str):
        labels = [labels]
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        err(BAD_FIELD, f"field 'labels' must be a list of strings, got {labels!r:.60}")
        return None, probs

    path = obj["image"] if os.path.isabs(obj["image"]) else os.path.join(root, obj["image"])
    if images != "none":
        if not os.path.isfile(path):
            err(MISSING_IMAGE, f"image file not found: {path}")
            return None, probs
        if images in ("header", "full"):
            try:
                fw, fh = image_size(path, full_decode=images == "full")
            except Exception as exc:  # PIL raises many types for corrupt files
                err(UNREADABLE_IMAGE, f"cannot read image {path}: {type(exc).__name__}: {exc}")
                return None, probs
            if (fw, fh) != (w, h):
                err(SIZE_MISMATCH, f"manifest says {w}x{h} but {path} is {fw}x{fh}")
                return None, probs

    regions = []
    for i, reg in enumerate(obj["regions"]):
        if not isinstance(reg, dict):
            err(BAD_FIELD, f"region must be an object, got {reg!r:.60}", i)
            continue
        missing = [k for k, t in REGION_REQUIRED.items() if not isinstance(reg.get(k), t)]
        if missing:
            err(MISSING_FIELD, f"region lacks {missing} (needs 'bbox' [x1,y1,x2,y2] and 'text')", i)
            continue
        box = reg["bbox"]
        if len(box) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box):
            err(BAD_FIELD, f"bbox must be 4 numbers [x1, y1, x2, y2], got {box!r:.60}", i)
            continue
        x1, y1, x2, y2 = (float(v) for v in box)
        if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
            err(NAN_BOX, f"bbox has NaN/inf: {box}", i)
            continue
        if x2 < x1 or y2 < y1:
            err(REVERSED_BOX, f"bbox corners reversed (need x1<=x2, y1<=y2): {box}", i)
            continue
        if x2 == x1 or y2 == y1:
            err(ZERO_AREA_BOX, f"bbox has zero area: {box}", i)
            continue
        cx1, cy1, cx2, cy2 = max(x1, 0.0), max(y1, 0.0), min(x2, float(w)), min(y2, float(h))
        if cx2 <= cx1 or cy2 <= cy1:
            err(OUTSIDE_BOX, f"bbox lies outside the {w}x{h} image: {box}", i)
            continue
        if (cx1, cy1, cx2, cy2) != (x1, y1, x2, y2):
            probs.append(Problem(file, line, CLIPPED_BOX,
                                 f"bbox {box} extends past the {w}x{h} image; clipped", i))
        r = dict(reg)
        r["bbox"] = [cx1, cy1, cx2, cy2]
        r.setdefault("label", r["text"])
        regions.append(r)
    if any(p.is_error for p in probs):
        return None, probs
    if not obj["regions"]:
        probs.append(Problem(file, line, NO_REGIONS, "record has no regions (kept: image-level only)"))
    if not obj["text"].strip():
        probs.append(Problem(file, line, EMPTY_TEXT, "image text is empty (kept)"))
    rec = dict(obj)
    rec["regions"] = regions
    rec["labels"] = list(labels)
    rec["image_path"] = path
    return rec, probs


def iter_lines(path: str):
    """Yield ``(line_no, text)`` for non-blank lines of a JSONL file (1-based)."""
    with open(path, encoding="utf-8") as fh:
        for no, text in enumerate(fh, 1):
            if text.strip():
                yield no, text


def manifest_path(root: str, name: str = ANNOTATIONS) -> tuple[str, str]:
    """(dataset folder, manifest file) of a folder or of a ``.jsonl`` file inside one (e.g. the
    ``annotations.fixed.jsonl`` that ``validate --fix`` writes); image paths are relative to
    the folder."""
    root = os.fspath(root)
    if root.endswith(".jsonl") and os.path.isfile(root):
        return os.path.dirname(os.path.abspath(root)), root
    return root, os.path.join(root, name)


def iter_manifest(root: str, *, images: str = "header", name: str = ANNOTATIONS):
    """``(line, raw text, record or None, problems)`` for each non-blank line of the manifest,
    one at a time (a loader packs records as they come instead of holding them all)."""
    root, path = manifest_path(root, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no manifest (a dataset folder needs {name})")
    for no, text in iter_lines(path):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            yield no, text, None, [Problem(path, no, BAD_JSON,
                                           f"not valid JSON: {exc.msg} at column {exc.colno}")]
            continue
        rec, probs = check_record(obj, root, path, no, images=images)
        if rec is not None:
            rec["_line"] = no
            rec["_file"] = path
        yield no, text, rec, probs


def scan_manifest(root: str, *, images: str = "header", name: str = ANNOTATIONS) -> tuple[ManifestReport, list[tuple[int, str, dict | None, list[Problem]]]]:
    """Check every line; return the report (all problems, every record error counted as
    skipped) and per-line details ``(line, raw text, record or None, problems)`` for --fix."""
    rep = ManifestReport()
    details = []
    for no, text, rec, probs in iter_manifest(root, images=images, name=name):
        rep.lines += 1
        rep.problems.extend(probs)
        if rec is None:
            rep.skipped += 1
        else:
            rep.records.append(rec)
        details.append((no, text, rec, probs))
    return rep, details


_warned: set[tuple[str, str]] = set()


def read_manifest(root: str, *, skip_bad: bool = False, images: str = "header",
                  report: ManifestReport | None = None) -> list[dict]:
    """Validated records of ``root/annotations.jsonl``.

    Each record is the manifest object plus ``image_path`` (absolute) and ``_line``; boxes
    partly outside the image are clipped (logged once per kind and manifest). A record error
    raises :class:`ManifestError` (``file:line: error: kind: message``) unless ``skip_bad``,
    in which case the record is skipped and counted in ``report.skipped`` (and logged).
    """
    rep, _ = scan_manifest(root, images=images)
    if report is not None:
        report.records, report.problems, report.skipped, report.lines = (
            rep.records, rep.problems, rep.skipped, rep.lines)
    errors = rep.errors
    if errors and not skip_bad:
        raise ManifestError(errors[0])
    for p in rep.warnings:
        key = (p.file, p.kind)
        if key not in _warned:
            _warned.add(key)
            n = sum(1 for q in rep.warnings if q.kind == p.kind)
            # Clipping changes the data: say so. Image-only records are normal (e.g. "no
            # finding" images), so they are only noted at INFO; `validate` lists them all.
            level = logging.WARNING if p.kind == CLIPPED_BOX else logging.INFO
            log.log(level, "%s (%d such in this manifest)", p, n)
    if rep.skipped:
        log.warning("%s: skipped %d bad record(s) of %d; first: %s",
                    manifest_path(root)[1], rep.skipped, rep.lines, errors[0])
    return rep.records


def read_qa(root: str) -> list[dict]:
    """``root/qa.jsonl`` records (``image``, ``question``, ``answer``); [] when absent.
    A malformed line raises ValueError naming file:line."""
    path = os.path.join(manifest_path(root)[0], QA)
    if not os.path.isfile(path):
        return []
    out = []
    for no, text in iter_lines(path):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ManifestError(Problem(path, no, BAD_JSON, f"not valid JSON: {exc.msg}")) from None
        for key in ("image", "question", "answer"):
            if not isinstance(obj, dict) or not isinstance(obj.get(key), str):
                raise ManifestError(Problem(path, no, MISSING_FIELD, f"needs string field {key!r}"))
        obj["_line"] = no
        out.append(obj)
    return out
