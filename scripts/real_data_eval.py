#!/usr/bin/env python
"""The study: region-aware RegionMed-CLIP against the global-only baseline on the shared real
datasets and the synthetic phantoms, levers chosen on a validation split, >= 5 seeds, paired
intervals and verdicts. Everything is in ``regionmed_fast/apps/study.py`` (``--help``);
docs/evaluation.md ("The study") has the protocol and the results.

    python scripts/real_data_eval.py --budget small --out runs/study
    python scripts/real_data_eval.py --budget tiny --datasets synthetic --out /tmp/x   # seconds
    python scripts/real_data_eval.py --from-json docs/results/study.json --readme
"""
import sys

import torch  # noqa: F401  (before regionmed_fast._C)

from regionmed_fast.apps.study import main

if __name__ == "__main__":
    sys.exit(main())
