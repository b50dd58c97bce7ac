"""benchmarks/gpu_check.sh and run_all.py without a GPU: the dry run checks every command the GPU
run would make (wheels, weights restore, build inputs, each benchmark's arguments, hooks)."""
from __future__ import annotations

import importlib
import os
import pathlib
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"


@pytest.fixture(scope="module")
def run_all():
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module("run_all")


def test_gpu_check_dry_run_checks_every_step(tmp_path):
    link = REPO / "regionmed_fast" / "kernels"
    had_link = link.exists()
    env = dict(os.environ, OUT=str(tmp_path), GPU_CHECK_DRY_COLLECT="0", PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "--dry-run"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    for bench in ("loss", "roi", "train", "data"):
        assert f"== dry run bench_{bench} " in log and f"bench_{bench}" in log, bench
    assert log.count(": ok") >= 4, log[-3000:]
    assert "setup.py parses" in log
    assert "tests (limit" in log and "-m gpu" in log
    assert (tmp_path / "results.tgz").is_file() and (tmp_path / "gpu_check.log").is_file()
    assert link.exists() == had_link  # a dry run leaves the checkout as it was


def test_dry_run_names_a_benchmark_that_rejects_its_arguments(run_all, tmp_path, capsys):
    ok = run_all.main(["--dry-run", "--only", "loss,train", "--device", "cuda", "--out", str(tmp_path),
                       "--args", "loss=--quick", "--args", "train=--quick --compile-mode whole"])
    assert ok == 0
    bad = run_all.main(["--dry-run", "--only", "train", "--device", "cuda", "--out", str(tmp_path),
                        "--args", "train=--no-such-flag"])
    out = capsys.readouterr().out
    assert bad == 1 and "bench_train" in out and "exit 2" in out
    assert "REGIONMED_BENCH_DRY" not in os.environ  # later benchmarks in this process still run


def test_per_bench_values(run_all):
    assert run_all.per_bench(["train=240,loss=60", "90"], "timeout", "1800") == {
        "*": "90", "train": "240", "loss": "60"}
    assert run_all.per_bench(['data=--workers 16 --quick'], "args") == {"data": "--workers 16 --quick"}
    with pytest.raises(SystemExit, match="unknown benchmark 'nope'"):
        run_all.per_bench(["nope=3"], "timeout")


def test_a_benchmark_past_its_limit_is_stopped_with_its_children(run_all, tmp_path):
    marker = tmp_path / "child.pid"
    t0 = time.time()
    rc = run_all.run_limited(["bash", "-c", f"sleep 60 & echo $! > {marker}; wait"], limit=1.0)
    assert rc is None and time.time() - t0 < 30
    pid = int(marker.read_text())
    time.sleep(0.2)
    assert not pathlib.Path(f"/proc/{pid}").exists() or "Z" in pathlib.Path(f"/proc/{pid}/stat").read_text().split()[2]
    assert run_all.run_limited([sys.executable, "-c", "raise SystemExit(3)"], limit=30) == 3
