"""The ``regionmed-fast`` command. Each subcommand lives with its subsystem and is imported
only when used, so ``regionmed-fast info`` works even where optional extras are missing."""
from __future__ import annotations

import importlib
import sys

from regionmed_fast.errors import UserError

# subcommand -> ("module:function", one-line help); each function takes argv (list[str]).
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("regionmed_fast.info:info_main", "show versions and which op backends can run here"),
    "synth": ("regionmed_fast.data.synthetic:cli_main", "write the synthetic phantom dataset"),
    "validate": ("regionmed_fast.data.cli:validate_main", "check a dataset folder, report file:line"),
    "shard": ("regionmed_fast.data.cli:shard_main", "write WebDataset .tar shards of a dataset"),
    "convert": ("regionmed_fast.data.cli:convert_main", "convert COCO / CSV / triplets to a manifest"),
    "train": ("regionmed_fast.train.cli:train_main", "progressive training from a stages YAML"),
    "demo": ("regionmed_fast.apps.demo:cli_main", "synthetic data, train region-aware vs global, compare"),
    "eval": ("regionmed_fast.eval.cli:eval_main", "retrieval, zero-shot, grounding, VQA with a report"),
    "bench": ("regionmed_fast.bench_cli:bench_main", "run the benchmark suite (benchmarks/run_all.py)"),
}


def _usage() -> str:
    width = max(len(k) for k in COMMANDS)
    rows = "\n".join(f"  {k:<{width}}  {h}" for k, (_, h) in COMMANDS.items())
    return f"usage: regionmed-fast COMMAND [ARGS...]\n\ncommands:\n{rows}\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"regionmed-fast: unknown command {cmd!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    target, _ = COMMANDS[cmd]
    mod_name, func_name = target.split(":")
    try:
        func = getattr(importlib.import_module(mod_name), func_name)
        return int(func(rest) or 0)
    except UserError as exc:
        # the message already names the file, line or argument at fault: one line, no traceback
        print(f"regionmed-fast {cmd}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
