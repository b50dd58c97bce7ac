"""``regionmed-fast bench``: runs ``benchmarks/run_all.py`` from a source checkout."""
from __future__ import annotations

import os
import subprocess
import sys


def bench_main(argv: list[str]) -> int:
    """``regionmed-fast bench ARGS``: ``python benchmarks/run_all.py ARGS``; returns its status."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(here, "benchmarks", "run_all.py")
    if not os.path.exists(script):
        print("regionmed-fast bench: benchmarks/run_all.py is part of the source checkout; "
              "run it from a clone of the repository (pip install -e .)", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, script, *argv])
