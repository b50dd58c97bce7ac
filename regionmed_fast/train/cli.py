"""``regionmed-fast train``: progressive training from a stage file.

    regionmed-fast train --config stages.yaml --data DIR_OR_SHARDS [--out RUN] [--baseline global]
                         [--resume] [--loader auto|cpu|dali] [--workers N] [--skip-bad]
                         [--cache-mb N] [--group-key KEY] [--val-fraction F] ...
    torchrun --nproc_per_node 4 -m regionmed_fast.cli train --config ... --data ...

``--config`` is a path, or the name of a shipped stage file (``progressive``, ``global``,
``demo``). Command-line options override the file's run-wide keys. ``--data`` is a dataset
folder (annotations.jsonl + images) or WebDataset shards (``regionmed-fast shard``'s folder, a
.tar, or a brace pattern); training reads its ``train`` split (records without a ``split``
field are assigned by the project's split rule with ``--group-key``, ``--test-fraction`` and
``--val-fraction``, recorded with the saved model so ``regionmed-fast eval`` uses the same).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

from regionmed_fast.train.stages import (StageFileError, builtin_config, load_run, validate_run)
from regionmed_fast.train.trainer import NonFiniteLossError, Trainer


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="regionmed-fast train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="stage file (.yaml/.toml) or a shipped name")
    p.add_argument("--data", required=True,
                   help="dataset folder (annotations.jsonl + images) or WebDataset shards")
    p.add_argument("--out", default=None, help="run folder (default runs/<time>)")
    p.add_argument("--baseline", choices=["global"], default=None,
                   help="global-only baseline: no ROI processor, region/fused losses off, same budget")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.pt")
    p.add_argument("--model", default=None, help="model name (default: the stage file's)")
    p.add_argument("--batch-size", type=int, default=None, help="global micro-batch")
    p.add_argument("--grad-accum", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default=None)
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    p.add_argument("--grad-checkpointing", action="store_true", default=None,
                   help="activation checkpointing in the encoders (less memory, more compute)")
    p.add_argument("--backend", default=None, help="backend of the fused ops (auto, reference, cpu, triton, cuda)")
    p.add_argument("--workers", type=int, default=None, help="data worker processes (CPU loader)")
    p.add_argument("--loader", choices=["auto", "cpu", "dali"], default=None,
                   help="data loader: auto (DALI GPU decode when installed and on a GPU, else CPU "
                        "workers), cpu, dali")
    p.add_argument("--skip-bad", action="store_true", default=None,
                   help="skip corrupt images and degenerate boxes (counted, logged per epoch) "
                        "instead of stopping at the first one")
    p.add_argument("--cache-mb", type=int, default=None,
                   help="decoded-sample cache budget in MiB per process (default 0: stream)")
    p.add_argument("--group-key", default=None,
                   help="record field whose value decides the split of records without one "
                        "(default: patient_id where present, else the image)")
    p.add_argument("--test-fraction", type=float, default=None,
                   help="share of groups held out as test (default 0.3)")
    p.add_argument("--val-fraction", type=float, default=None,
                   help="share of groups carved out of the training data as val (default 0)")
    p.add_argument("--log-every", type=int, default=None)
    p.add_argument("--save-every", type=int, default=None)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--split", default="train", help="manifest split to train on (default train)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


_OVERRIDES = {"model": "model", "batch_size": "batch_size", "grad_accum": "grad_accum", "lr": "lr",
              "seed": "seed", "image_size": "image_size", "precision": "precision",
              "compile": "compile", "grad_checkpointing": "grad_checkpointing",
              "backend": "backend", "workers": "num_workers", "log_every": "log_every",
              "save_every": "save_every", "loader": "loader", "skip_bad": "skip_bad",
              "cache_mb": "cache_mb", "group_key": "group_key", "test_fraction": "test_fraction",
              "val_fraction": "val_fraction"}


def train_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    path = args.config if os.path.exists(args.config) else None
    try:
        if path is None:
            path = builtin_config(args.config)
        cfg = load_run(path)
        changes = {field: getattr(args, opt) for opt, field in _OVERRIDES.items()
                   if getattr(args, opt) is not None}
        cfg = dataclasses.replace(cfg, **changes)
        if args.baseline == "global":
            cfg = cfg.as_baseline()
        validate_run(cfg, "command line")
    except (StageFileError, FileNotFoundError) as exc:
        print(f"regionmed-fast train: {exc}", file=sys.stderr)
        return 2
    out = args.out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    # errors that are the input's fault (a bad record, a checkpoint of another config, --data
    # that is no dataset) are UserErrors: the regionmed-fast command prints them as one line
    trainer = Trainer(cfg, args.data, out, resume=args.resume, device=args.device,
                      progress=not args.no_progress, split=args.split)
    try:
        summary = trainer.fit()
    except NonFiniteLossError as exc:
        print(f"regionmed-fast train: stopped: {exc}", file=sys.stderr)
        return 3
    finally:
        trainer.close()
    if trainer.dist.main:
        print(f"done: {summary['global_step']} steps in {summary['wall_s']:.1f} s, final loss "
              f"{summary['final_loss']:.4f}; model in {os.path.join(out, 'model')}, log "
              f"{os.path.join(out, 'train_log.jsonl')}")
    return 0
