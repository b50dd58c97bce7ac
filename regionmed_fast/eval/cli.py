"""``regionmed-fast eval --model MODEL_OR_RUN --data DIR [--split test] [--tasks ...] [--report OUT]``.

Prints every headline number with its 95 % interval, the oracle-box rows apart, and each
difference of rows with its paired interval; a difference is called higher or lower only when
its interval excludes 0.
"""
from __future__ import annotations

import argparse
import json
import sys

from .report import clean, summary_lines
from .runner import TASKS, evaluate, load_model


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="regionmed-fast eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="save_pretrained folder or training run folder")
    p.add_argument("--data", required=True, help="dataset folder with annotations.jsonl")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}")
    p.add_argument("--report", default=None, help="folder for report.md, results.json and figures")
    p.add_argument("--split", default="test", choices=("test", "val", "train", "all"),
                   help="which split to score (default test)")
    p.add_argument("--group-key", default=None,
                   help="record field whose value decides the split of records without one "
                        "(default: what the model's training run recorded, else patient_id "
                        "where present, else the image)")
    p.add_argument("--test-fraction", type=float, default=None,
                   help="share of groups in test (default: the training run's, else 0.3)")
    p.add_argument("--val-fraction", type=float, default=None,
                   help="share of groups carved from training data as val (default: the "
                        "training run's, else 0); --split val needs the trainer's value")
    p.add_argument("--num-boxes", type=int, default=None,
                   help="proposed boxes per image (default: the model's proposer setting)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--chunk-size", type=int, default=1024, help="similarity tile side for retrieval")
    p.add_argument("--seed", type=int, default=0, help="seed of the VQA head and the bootstrap")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print the results JSON instead of a summary")
    return p


def eval_main(argv: list[str]) -> int:
    a = build_parser().parse_args(argv)
    try:
        model = load_model(a.model).to(a.device)
        res = evaluate(model, a.data, tasks=a.tasks, report_dir=a.report, split=a.split,
                       batch_size=a.batch_size, chunk_size=a.chunk_size, group_key=a.group_key,
                       test_fraction=a.test_fraction, val_fraction=a.val_fraction, seed=a.seed,
                       proposer={"num_boxes": a.num_boxes} if a.num_boxes else None)
    except (FileNotFoundError, ValueError) as e:
        print(f"regionmed-fast eval: error: {e}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps(clean({k: v for k, v in res.items() if k != "timing_s"}), indent=1))
    else:
        print("\n".join(summary_lines(res)))
    return 0
