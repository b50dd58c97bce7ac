"""``regionmed-fast eval --model RUN_OR_DIR --data DIR [--tasks ...] [--report OUT]``."""
from __future__ import annotations

import argparse
import json
import sys

from .runner import TASKS


def _fmt(res: dict) -> str:
    lines = [f"{res['n_images']} images ({res['split']}), region-aware: {res['region_aware']}"]
    r = res.get("retrieval")
    if r:
        for d in ("image_to_text", "text_to_image"):
            for k, s in r[d].items():
                lines.append(f"  {d:14s} {k:12s} R@1 {100 * s['R@1']:5.1f}  R@5 {100 * s['R@5']:5.1f}  "
                             f"R@10 {100 * s['R@10']:5.1f}  median rank {s['median_rank']:g}")
        rt = r.get("region_to_text", {})
        if "R@1" in rt:
            lines.append(f"  region_to_text              R@1 {100 * rt['R@1']:5.1f}  median rank {rt['median_rank']:g}")
    z = res.get("zeroshot", {})
    for k, v in z.get("by_embedding", {}).items():
        lines.append(f"  zero-shot {k:12s} acc {100 * v['accuracy']:5.1f}  bal.acc {100 * v['balanced_accuracy']:5.1f}  "
                     f"macro AUROC {100 * v['macro_auroc']:5.1f}")
    g = res.get("grounding", {})
    if "accuracy" in g.get("box_choice", {}):
        lines.append(f"  grounding box choice {100 * g['box_choice']['accuracy']:5.1f} (chance {100 * g['box_choice']['chance']:.1f})")
    if "hit_rate" in g.get("pointing_game", {}):
        lines.append(f"  pointing game {100 * g['pointing_game']['hit_rate']:5.1f} (centre {100 * g['pointing_game']['centre_baseline']:.1f})")
    v = res.get("vqa", {})
    if v.get("accuracy") is not None:
        pct = lambda x: "-" if x is None else f"{100 * x:.1f}"  # noqa: E731
        lines.append(f"  VQA acc {pct(v['accuracy'])}  closed {pct(v['closed_accuracy'])}  "
                     f"open {pct(v['open_accuracy'])}  (question prior {pct(v['prior_baseline']['accuracy'])})  "
                     f"[{v['qa_source']}]")
    if res.get("report_files"):
        lines.append(f"report: {', '.join(res['report_files'])}")
    return "\n".join(lines)


def eval_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="regionmed-fast eval", description=__doc__)
    p.add_argument("--model", required=True, help="save_pretrained folder or training run folder")
    p.add_argument("--data", required=True, help="dataset folder with annotations.jsonl")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}")
    p.add_argument("--report", default=None, help="folder for report.md, results.json and figures")
    p.add_argument("--split", default="test", help="test (= val), train or all (default test)")
    p.add_argument("--group-key", default=None,
                   help="record field to split by when records have no 'split' (e.g. patient_id)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--chunk-size", type=int, default=1024, help="similarity tile side for retrieval")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print the results JSON instead of a summary")
    a = p.parse_args(argv)
    from .report import _clean
    from .runner import evaluate, load_model

    try:
        model = load_model(a.model).to(a.device)
        res = evaluate(model, a.data, tasks=a.tasks, report_dir=a.report,
                       split=None if a.split == "all" else a.split, batch_size=a.batch_size,
                       chunk_size=a.chunk_size, group_key=a.group_key)
    except (FileNotFoundError, ValueError) as e:
        print(f"regionmed-fast eval: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(_clean(res), indent=1) if a.json else _fmt(res))
    return 0
