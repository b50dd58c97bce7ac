"""The benchmark timing method (benchmarks/runner.py) and how the README flags a spread figure.

The CUDA path of ``runner.measure`` is exercised here with a stand-in for one timed sample, so
that the warm-up and sampling rules are tested without a GPU (docs/gpu-run.md says why they
exist: the "encoders alone" figure of an H200 run spread from 45 to 182 ms).
"""
from __future__ import annotations

import importlib
import json
import pathlib
import statistics

import pytest

BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    import sys

    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


@pytest.fixture()
def runner(monkeypatch):
    mod = _load("runner")
    monkeypatch.setattr(mod, "CUDA_MIN_WARMUP_S", 0.0)

    def fake_sample(fn, calls, cuda):  # the case reports its own simulated ms per call
        return statistics.mean(fn() for _ in range(calls)), "events"

    monkeypatch.setattr(mod, "_sample", fake_sample)
    return mod


def rotating_shapes(first_ms: float = 180.0, ms: float = 45.0, shapes: int = 4):
    """A step cycling over batches of ``shapes`` shapes, slow the first time each is seen (as
    allocator growth, autotuning or a cuDNN plan would make it)."""
    seen, state = set(), {"i": 0}

    def fn():
        state["i"] = (state["i"] + 1) % shapes
        first = state["i"] not in seen
        seen.add(state["i"])
        return first_ms if first else ms + 0.1 * state["i"]
    return fn


def test_old_rule_times_first_calls_of_each_shape(runner, monkeypatch):
    # what the H200 run did: one warm-up call, three timed: two of them first-time shapes
    monkeypatch.setattr(runner, "CUDA_MIN_REPEATS", 3)
    monkeypatch.setattr(runner, "SETTLE_WINDOW", 1)
    monkeypatch.setattr(runner, "SETTLE_TOL", 10.0)
    t = runner.measure(rotating_shapes(), "cuda", warmup=2, repeats=3)
    med = statistics.median(t.times)
    assert med == 180.0 and min(t.times) < 46  # 180 ms median, 45 ms min: the H200 figure
    assert runner.spread(med, min(t.times), max(t.times)) > runner.SPREAD_LIMIT


def test_warmup_runs_until_every_shape_is_warm(runner):
    t = runner.measure(rotating_shapes(), "cuda", warmup=1, repeats=3)
    assert t.settled and t.warmup_calls >= 4 + runner.SETTLE_WINDOW
    assert len(t.times) >= runner.CUDA_MIN_REPEATS  # at least 10 samples on a GPU
    med = statistics.median(t.times)
    assert 45 <= med < 46 and runner.spread(med, min(t.times), max(t.times)) <= runner.SPREAD_LIMIT


def test_a_figure_that_never_settles_is_flagged(runner, monkeypatch):
    monkeypatch.setattr(runner, "CUDA_SETTLE_S", 0.05)
    state = {"i": 0}

    def alternating():
        state["i"] += 1
        return 45.0 if state["i"] % 2 else 180.0

    t = runner.measure(alternating, "cuda", warmup=1, repeats=3)
    assert not t.settled
    res = runner.Result("x", "g", "cuda", 100.0, 45.0, 180.0, 3, 0.0, {}, spread=0.8, settled=False)
    assert not res.spread_ok


def test_short_calls_are_timed_in_runs_of_several(runner):
    t = runner.measure(lambda: 0.25, "cuda", warmup=1, repeats=3)
    assert t.calls_per_sample == 8  # 2 ms samples of 0.25 ms calls
    assert statistics.median(t.times) == 0.25


def test_cpu_keeps_the_given_warmup_and_repeats(runner):
    calls = []
    t = runner.measure(lambda: calls.append(1) or 5.0, "cpu", warmup=2, repeats=3)
    assert len(calls) == 5 and t.warmup_calls == 2 and len(t.times) == 3 and t.settled


def test_run_cases_records_spread_and_markdown_marks_it(runner):
    vals = iter([10.0] * 20 + [30.0])

    def fn():
        return next(vals, 10.0)

    res = runner.run_cases([runner.Case("c", fn, group="g", device="cpu")], warmup=0, repeats=3,
                           memory=False, verbose=False)[0]
    assert res.spread == 0.0 and res.spread_ok
    bad = runner.Result("c", "g", "cuda", 10.0, 5.0, 20.0, 10, 1.0, {}, spread=1.0)
    table = runner.markdown_table([res, bad])
    assert "| 0% |" in table and "100% (!)" in table and "not a steady-state time" in table


def test_readme_flags_a_spread_figure_and_shows_the_openclip_goals(tmp_path):
    rp = _load("readme_perf")
    machine = {"tag": "gpu-test", "platform": "Linux", "python": "3.12", "torch": "2.11", "cpus": 16,
               "threads": 16, "gpu": "Test GPU", "cuda": "13.0"}
    group = "train step vs OpenCLIP, ViT-B/16 224 px, batch 256, 4 boxes/image, bf16, eager"

    def row(name, ms, lo, hi, ratios):
        return {"name": name, "group": group, "device": "cuda", "median_ms": ms, "min_ms": lo,
                "max_ms": hi, "repeats": 10, "peak_mem_mb": 1.0, "meta": {"samples_per_s": 256e3 / ms},
                "ratios": ratios, "error": "", "spread": 0.0, "settled": True}

    rows = [row("OpenCLIP ViT-B-16", 200.0, 198.0, 203.0, {"speedup vs OpenCLIP ViT-B-16": 1.0}),
            row("ours global-only", 190.0, 100.0, 191.0, {"speedup vs OpenCLIP ViT-B-16": 200 / 190}),
            row("ours region-aware", 220.0, 219.0, 221.0, {"speedup vs OpenCLIP ViT-B-16": 200 / 220,
                                                           "vs ours global-only": 190 / 220})]
    payload = {"bench": "train", "time": "2026-01-02T03:04:05+00:00", "machine": machine, "results": rows}
    (tmp_path / "gpu-test-train.json").write_text(json.dumps(payload))
    out = rp.render(str(tmp_path))
    assert group in out  # the group is its own row label, not the backend table's
    assert "(! -47%/+1%)" in out and "not a steady-state time" in out
    assert "ours global-only >= 1.0x OpenCLIP: met" in out
    assert "region-aware >= 0.9x global-only samples/s: **missed**" in out  # 0.86x
    assert "0.86x global-only" in out
    rows[0]["meta"]["compile_s"], rows[1]["meta"]["compile_s"] = 30.2, 12.4
    (tmp_path / "gpu-test-train.json").write_text(json.dumps(payload))
    again = rp.render(str(tmp_path))
    assert "compile 12 s" not in out and "compile 12 s" in again and "samples/s, compile 30 s" in again
