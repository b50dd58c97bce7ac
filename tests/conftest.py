"""Test set-up shared by every test file.

Triton kernels run in the interpreter on CPU tensors when there is no GPU; the variable must
be set before ``triton`` is imported anywhere, hence here, at collection time.
"""
from __future__ import annotations

import os
import pathlib
import re

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(os.environ.get("REGIONMED_SHARED_DATA", REPO.parent / "shared" / "data"))


def _opted_into_slow(config) -> bool:
    """Slow tests run only when the ``-m`` expression names the ``slow`` marker (``-m slow``,
    ``-m "slow or gpu"``; ``-m "slow or not slow"`` runs everything); a plain ``pytest tests``
    leaves them out."""
    return re.search(r"\bslow\b", config.getoption("markexpr") or "") is not None


def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason="slow (over ~30 s): not in the default run; opt in with -m slow")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run benchmarks/gpu_check.sh on one)")
    run_slow, on_gpu = _opted_into_slow(config), torch.cuda.is_available()
    for item in items:
        if item.get_closest_marker("slow") and not run_slow:
            item.add_marker(skip_slow)
        # the marker, not "gpu" in item.keywords: a folder named gpu would match that
        if item.get_closest_marker("gpu") and not on_gpu:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """``../shared/data`` (or ``$REGIONMED_SHARED_DATA``); skips when the real data is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real datasets not found at {SHARED_DATA} (set REGIONMED_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
