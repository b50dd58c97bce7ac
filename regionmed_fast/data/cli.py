"""Data subcommands of ``regionmed-fast``: validate, shard, convert (each takes an argv list)."""
from __future__ import annotations


def validate_main(argv: list[str]) -> int:
    """``regionmed-fast validate DIR [--fix] [--quick]``."""
    from .validate import validate_main as main

    return main(argv)


def convert_main(argv: list[str]) -> int:
    """``regionmed-fast convert --from coco|csv|triplets|chestxray14|vindr|rsna FILE --images DIR
    --out DIR [--columns KEY=COL,...]``."""
    from .convert import convert_main as main

    return main(argv)


def shard_main(argv: list[str]) -> int:
    """``regionmed-fast shard DIR --out SHARDS [--size 256MB] [--skip-bad]``."""
    import argparse

    from .manifest import ManifestError
    from .shards import write_shards

    ap = argparse.ArgumentParser(prog="regionmed-fast shard",
                                 description="write WebDataset .tar shards of a dataset folder")
    ap.add_argument("dir", help="dataset folder (annotations.jsonl + images) or a .jsonl file")
    ap.add_argument("--out", required=True, help="output folder for shard-*.tar and shards.json")
    ap.add_argument("--size", default="256MB", help="maximum shard size (e.g. 256MB, 1GB)")
    ap.add_argument("--skip-bad", action="store_true", help="skip bad records instead of failing")
    args = ap.parse_args(argv)
    try:
        index = write_shards(args.dir, args.out, max_bytes=args.size, skip_bad=args.skip_bad)
    except (ManifestError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}")
        return 1
    print(f"wrote {len(index['shards'])} shard(s), {index['total']} sample(s) to {args.out}"
          + (f" ({index['skipped']} bad record(s) skipped)" if index["skipped"] else ""))
    return 0
