"""``regionmed-fast validate DIR [--fix]``: every problem of a dataset folder with file and line,
a summary, and optionally a cleaned manifest written next to the original (never over it).

--fix keeps every usable record, with boxes partly outside the image clipped; it drops the
regions whose box is NaN, reversed, zero-area or entirely outside (keeping the rest of the
record), and drops records that are not JSON, lack fields, or name a missing, unreadable or
wrongly-sized image. Output: ``annotations.fixed.jsonl`` (loadable by passing its path to
``make_loader`` or ``read_manifest``).
"""
from __future__ import annotations

import collections
import json
import os

from .manifest import (QA, REGION_KINDS, ManifestReport, Problem, check_record, iter_lines,
                       manifest_path, scan_manifest)

FIXED = "annotations.fixed.jsonl"
_PRIVATE = ("image_path", "_line", "_file")


def check_qa(root: str, images: set[str]) -> list[Problem]:
    """Problems of ``qa.jsonl`` (bad JSON, missing fields, image not in the manifest)."""
    path = os.path.join(root, QA)
    probs: list[Problem] = []
    if not os.path.isfile(path):
        return probs
    for no, text in iter_lines(path):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            probs.append(Problem(path, no, "bad_json", f"not valid JSON: {exc.msg} at column {exc.colno}"))
            continue
        if not isinstance(obj, dict):
            probs.append(Problem(path, no, "bad_json", "expected a JSON object"))
            continue
        missing = [k for k in ("image", "question", "answer") if not isinstance(obj.get(k), str)]
        if missing:
            probs.append(Problem(path, no, "missing_field", f"needs string field(s) {missing}"))
        elif obj["image"] not in images and not os.path.isfile(os.path.join(root, obj["image"])):
            probs.append(Problem(path, no, "missing_image", f"image {obj['image']!r} not found"))
    return probs


def validate(root: str, *, images: str = "full") -> tuple[ManifestReport, list]:
    """Check ``root`` (folder or .jsonl) fully: every image decoded (``images="full"``)."""
    rep, details = scan_manifest(root, images=images)
    folder = manifest_path(root)[0]
    rep.problems.extend(check_qa(folder, {r["image"] for r in rep.records}))
    return rep, details


def summary(rep: ManifestReport) -> str:
    kinds = collections.Counter(p.kind for p in rep.problems)
    lines = [f"{rep.lines} record(s): {len(rep.records)} usable, {rep.skipped} with errors; "
             f"{len(rep.errors)} error(s), {len(rep.warnings)} warning(s)"]
    for kind, n in sorted(kinds.items()):
        lines.append(f"  {kind}: {n}")
    return "\n".join(lines)


def fix(root: str, details: list, *, images: str = "full") -> tuple[str, int, int, int]:
    """Write the cleaned manifest; returns (path, records kept, records dropped, regions dropped)."""
    folder, src = manifest_path(root)
    out = os.path.join(folder, FIXED)
    if os.path.abspath(out) == os.path.abspath(src):
        out = os.path.join(folder, "annotations.fixed2.jsonl")
    kept = dropped = regions_dropped = 0
    with open(out, "w", encoding="utf-8") as fh:
        for no, text, rec, probs in details:
            if rec is None:
                bad_regions = {p.region for p in probs if p.is_error and p.kind in REGION_KINDS}
                only_regions = all(p.kind in REGION_KINDS for p in probs if p.is_error)
                if not only_regions:
                    dropped += 1
                    continue
                obj = json.loads(text)
                obj["regions"] = [r for i, r in enumerate(obj["regions"]) if i not in bad_regions]
                regions_dropped += len(bad_regions)
                rec, again = check_record(obj, folder, src, no, images=images)
                if rec is None:
                    dropped += 1
                    continue
            clean = {k: v for k, v in rec.items() if k not in _PRIVATE}
            fh.write(json.dumps(clean, ensure_ascii=False) + "\n")
            kept += 1
    return out, kept, dropped, regions_dropped


def validate_main(argv: list[str]) -> int:
    """CLI: exit 0 when there is no error (warnings allowed), 1 otherwise."""
    import argparse

    ap = argparse.ArgumentParser(prog="regionmed-fast validate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", help="dataset folder (annotations.jsonl + images) or a .jsonl file")
    ap.add_argument("--fix", action="store_true", help=f"write {FIXED} next to the manifest")
    ap.add_argument("--quick", action="store_true", help="read image headers only (no full decode)")
    ap.add_argument("--max-print", type=int, default=1000, help="print at most this many problems")
    args = ap.parse_args(argv)
    try:
        rep, details = validate(args.dir, images="header" if args.quick else "full")
    except FileNotFoundError as exc:
        print(f"error: {exc}")
        return 2
    for p in rep.problems[: args.max_print]:
        print(p)
    if len(rep.problems) > args.max_print:
        print(f"... {len(rep.problems) - args.max_print} more problem(s) not shown")
    print(summary(rep))
    if args.fix:
        out, kept, dropped, rdrop = fix(args.dir, details, images="header" if args.quick else "full")
        print(f"wrote {out}: {kept} record(s) kept, {dropped} dropped, {rdrop} region(s) dropped")
    return 1 if rep.errors else 0
