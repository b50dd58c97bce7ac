"""Shared benchmark runner: time (median/min/max), peak memory, ratios, JSON + Markdown output.

Every ``bench_*.py`` builds a list of cases and calls :func:`run_cases`; each case names its
baselines, and ratios are always taken against cases measured in the same run. Results go to
``benchmarks/results/<machine-tag>-<bench>.json`` and ``.md`` (and a history CSV).

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` above what was allocated before the
call; on the CPU, the process's peak resident set (``VmHWM``, reset through
``/proc/self/clear_refs``) above the resident set before the call. The CPU figure is page
granular and includes allocator slack, so it is an upper bound on the tensors' own bytes.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import gc
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# the key of a case's speed-up over baseline ``name`` is SPEEDUP_VS + name (readme_perf reads it back)
SPEEDUP_VS = "speedup vs "


def _pin_mmap_threshold() -> None:
    # glibc raises its mmap threshold after large frees and then reuses freed heap pages, so a
    # case that follows another would show no RSS growth; a fixed 128 KiB threshold makes every
    # large tensor a fresh mapping that the peak-RSS measurement sees.
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except Exception:
        pass


_pin_mmap_threshold()


@dataclass
class Case:
    """One thing to time. ``fn`` runs it once; ``setup`` (optional) builds fresh inputs per run.

    ``group`` collects cases that compare with each other (same shape); ``baseline`` names the
    case in the group to divide by; ``floor_ms`` is the physical floor for the group (optional).
    """

    name: str
    fn: Callable[[], object]
    group: str = ""
    device: str = "cpu"
    meta: dict = field(default_factory=dict)


@dataclass
class Result:
    name: str
    group: str
    device: str
    median_ms: float
    min_ms: float
    max_ms: float
    repeats: int
    peak_mem_mb: float
    meta: dict
    ratios: dict = field(default_factory=dict)
    error: str = ""
    # how the figure was taken (see measure): spread = max distance of min/max from the median
    spread: float = float("nan")
    settled: bool = True
    warmup_calls: int = 0
    calls_per_sample: int = 1
    clock: str = ""

    @property
    def spread_ok(self) -> bool:
        """Min and max within SPREAD_LIMIT of the median, after a settled warm-up."""
        return self.settled and self.spread <= SPREAD_LIMIT


def machine_tag() -> str:
    """A short name of the machine: GPU name when CUDA is present, else CPU count and arch."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        return "gpu-" + "".join(c if c.isalnum() else "-" for c in name).strip("-").lower()
    return f"cpu{os.cpu_count()}-{platform.machine()}"


def machine_info() -> dict:
    info = {"tag": machine_tag(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpus": os.cpu_count(), "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        pass
    return info


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _rss() -> tuple[int, int]:
    vals = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                vals[key] = int(rest.split()[0]) * 1024
    return vals["VmRSS"], vals["VmHWM"]


def peak_memory_mb(fn: Callable[[], object], device: str) -> float:
    """Extra peak memory (MiB) of one call of ``fn`` over what was in use before it."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        del out
        return (peak - before) / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        before, _ = _rss()
        out = fn()
        _, peak = _rss()
        del out
        return max(peak - before, 0) / 2**20
    except OSError:
        return float("nan")


# Every figure is held to this: its fastest and slowest timed sample lie within this fraction of
# its median (docs/gpu-run.md says why the GPU figures once did not, and what the method does).
SPREAD_LIMIT = 0.15
# On CUDA the warm-up runs until the last SETTLE_WINDOW samples lie within SETTLE_TOL of their
# median (and at least CUDA_MIN_WARMUP_S of work has run, so the clocks have ramped up), at
# most CUDA_SETTLE_S; each sample is at least CUDA_SAMPLE_MS long (several back-to-back calls
# for short ops, so launch latency overlaps as in real use), and at least CUDA_MIN_REPEATS
# samples are timed.
SETTLE_WINDOW, SETTLE_TOL = 5, 0.08
CUDA_MIN_WARMUP_S, CUDA_SETTLE_S, CUDA_SAMPLE_MS, CUDA_MIN_REPEATS = 1.0, 20.0, 2.0, 10
# the minimum warm-up is for clocks that dropped while the GPU idled: a case timed right after
# another (within CUDA_STILL_BUSY_S) starts with them up
CUDA_STILL_BUSY_S = 0.5
_last_sample_end = float("-inf")


@dataclass
class Timing:
    """What :func:`measure` saw: ``times`` are ms per call, one per timed sample."""

    times: list[float]
    warmup_calls: int
    settled: bool  # the warm-up reached a steady state before timing began
    calls_per_sample: int
    clock: str = "events"  # "wall" when host time exceeded the stream's events (see measure)


def spread(median: float, lo: float, hi: float) -> float:
    """The larger relative distance of ``lo`` or ``hi`` from ``median`` (0.1: within 10 %)."""
    if not median > 0:
        return float("nan")
    return max(hi / median - 1.0, 1.0 - lo / median)


def _sample(fn: Callable[[], object], calls: int, cuda: bool) -> tuple[float, str]:
    """ms per call of ``calls`` back-to-back calls."""
    if not cuda:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - t0) * 1e3 / calls, "wall"
    # CUDA events time the current stream; the host clock between two device-wide syncs also
    # sees work on other streams (loaders) and host-bound steps. Use the events unless the host
    # saw clearly more.
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    s.record()
    for _ in range(calls):
        fn()
    e.record()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) * 1e3
    ev = s.elapsed_time(e)
    if wall > 1.2 * ev and wall - ev > 0.2:
        return wall / calls, "wall"
    return ev / calls, "events"


def _steady(window: list[float]) -> bool:
    if len(window) < SETTLE_WINDOW:
        return False
    last = window[-SETTLE_WINDOW:]
    return spread(statistics.median(last), min(last), max(last)) <= SETTLE_TOL


def measure(fn: Callable[[], object], device: str, warmup: int = 1, repeats: int = 5,
            max_seconds: float = 30.0) -> Timing:
    """Warm ``fn`` up, then time ``repeats`` samples (fewer once ``max_seconds`` have passed,
    at least 3).

    CPU: ``warmup`` plain calls, one call per sample. CUDA: at least ``warmup`` calls and
    ``CUDA_MIN_WARMUP_S`` seconds (none right after another measurement), then on until the samples settle (clock ramp, allocator
    growth, autotuning, recompiles all end before timing); samples of at least
    ``CUDA_SAMPLE_MS``; at least ``CUDA_MIN_REPEATS`` samples. Garbage collection is off while
    the samples are timed.
    """
    global _last_sample_end
    cuda = device.startswith("cuda")
    min_warmup_s = (0.0 if time.perf_counter() - _last_sample_end < CUDA_STILL_BUSY_S
                    else CUDA_MIN_WARMUP_S)
    calls, per, settled = 0, 1, True
    window: list[float] = []
    t_start = time.perf_counter()
    while True:
        if cuda and calls >= max(warmup, 1):
            elapsed = time.perf_counter() - t_start
            if elapsed >= min_warmup_s and _steady(window):
                break
            if elapsed >= CUDA_SETTLE_S:
                settled = False
                break
        elif not cuda and calls >= warmup:
            break
        t, _ = _sample(fn, per, cuda)
        if calls == 0:  # a first call's compile or autotuning is not part of the settling time
            t_start = time.perf_counter()
        calls += per
        window.append(t)
        if cuda:
            want = max(1, min(1000, math.ceil(CUDA_SAMPLE_MS / max(t, 1e-3))))
            if want > per:  # longer samples from now on: the window restarts with them
                per, window = want, []
    n = max(repeats, CUDA_MIN_REPEATS) if cuda else repeats
    times: list[float] = []
    clocks = set()
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        start_all = time.perf_counter()
        for _ in range(n):
            t, clock = _sample(fn, per, cuda)
            times.append(t)
            clocks.add(clock)
            if time.perf_counter() - start_all > max_seconds and len(times) >= 3:
                break
    finally:
        if was_enabled:
            gc.enable()
        _last_sample_end = time.perf_counter()
    return Timing(times, calls, settled, per, "wall" if "wall" in clocks else "events")


def time_fn(fn: Callable[[], object], device: str, warmup: int, repeats: int,
            max_seconds: float) -> list[float]:
    """ms per call of each timed sample (see :func:`measure`)."""
    return measure(fn, device, warmup, repeats, max_seconds).times


def run_cases(cases: list[Case], *, warmup: int = 1, repeats: int = 5, max_seconds: float = 30.0,
              baselines: dict[str, str] | None = None, floors: dict[str, float] | None = None,
              memory: bool = True, verbose: bool = True) -> list[Result]:
    """Time every case, then fill ``ratios``: ``vs <baseline>`` = baseline time / case time
    (above 1 means faster than the baseline), and ``floor / time`` where a floor is given.

    ``baselines`` maps a group to the names of its baseline cases (comma separated);
    ``floors`` maps a group to its floor in ms (measured in the same run).
    """
    results: list[Result] = []
    for case in cases:
        cuda = case.device.startswith("cuda")
        try:
            # CUDA: peak memory of a call in the steady state (after the warm-up's autotuning and
            # compiles); CPU: the first call, which doubles as warm-up for cases taking seconds
            mem = peak_memory_mb(case.fn, case.device) if memory and not cuda else float("nan")
            tm = measure(case.fn, case.device, warmup, repeats, max_seconds)
            if memory and cuda:
                mem = peak_memory_mb(case.fn, case.device)
            med = statistics.median(tm.times)
            res = Result(case.name, case.group, case.device, med, min(tm.times), max(tm.times),
                         len(tm.times), mem, case.meta, spread=spread(med, min(tm.times), max(tm.times)),
                         settled=tm.settled, warmup_calls=tm.warmup_calls,
                         calls_per_sample=tm.calls_per_sample, clock=tm.clock)
        except Exception as exc:  # a baseline that cannot run here is reported, not fatal
            res = Result(case.name, case.group, case.device, float("nan"), float("nan"),
                         float("nan"), 0, float("nan"), case.meta, error=f"{type(exc).__name__}: {exc}")
        results.append(res)
        if verbose:
            if res.error:
                print(f"  {case.group:<28} {case.name:<30} ERROR {res.error[:120]}", flush=True)
            else:
                flag = "" if res.spread_ok else ("  UNSETTLED" if not res.settled else "  SPREAD>15%")
                print(f"  {case.group:<28} {case.name:<30} {res.median_ms:10.2f} ms "
                      f"(min {res.min_ms:.2f}, max {res.max_ms:.2f}, n={res.repeats}"
                      f"{f' x{res.calls_per_sample} calls' if res.calls_per_sample > 1 else ''}, "
                      f"spread {100 * res.spread:.0f}%, warm-up {res.warmup_calls})  "
                      f"peak +{res.peak_mem_mb:.1f} MiB{flag}", flush=True)
    fill_ratios(results, baselines, floors)
    return results


def fill_ratios(results: list[Result], baselines: dict[str, str] | None = None,
                floors: dict[str, float] | None = None) -> None:
    """(Re)compute every result's ratios against its group's baselines and floor; call it again
    after replacing ``peak_mem_mb`` (e.g. with peaks measured in a child process)."""
    by_group: dict[str, dict[str, Result]] = {}
    for r in results:
        by_group.setdefault(r.group, {})[r.name] = r
    for group, members in by_group.items():
        names = (baselines or {}).get(group, "")
        for base_name in [n for n in names.split(",") if n]:
            base = members.get(base_name)
            if base is None or base.error:
                continue
            for r in members.values():
                if not r.error and r.median_ms > 0:
                    r.ratios[SPEEDUP_VS + base_name] = base.median_ms / r.median_ms
                    if base.peak_mem_mb > 0 and r.peak_mem_mb == r.peak_mem_mb:
                        r.ratios[f"memory vs {base_name}"] = r.peak_mem_mb / base.peak_mem_mb
        floor = (floors or {}).get(group)
        if floor:
            for r in members.values():
                if not r.error and r.median_ms > 0:
                    r.ratios["time / floor"] = r.median_ms / floor


def markdown_table(results: list[Result], title: str = "") -> str:
    """Results as a Markdown table, one row per case, ratios in the last column."""
    lines = [f"### {title}", ""] if title else []
    lines += ["| group | case | median ms | min ms | max ms | spread | peak MiB | ratios |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in results:
        ratios = "; ".join(f"{k} {v:.2f}x" if "floor" not in k else f"{k} {v:.2f}"
                           for k, v in r.ratios.items())
        if r.error:
            lines.append(f"| {r.group} | {r.name} | error | | | | | {r.error[:80]} |")
        else:
            sp = f"{100 * r.spread:.0f}%" + ("" if r.spread_ok else " (!)")
            lines.append(f"| {r.group} | {r.name} | {r.median_ms:.2f} | {r.min_ms:.2f} | "
                         f"{r.max_ms:.2f} | {sp} | {r.peak_mem_mb:.1f} | {ratios} |")
    if any(not r.error and not r.spread_ok for r in results):
        lines += ["", f"(!) min or max more than {100 * SPREAD_LIMIT:.0f} % from the median, or a "
                      "warm-up that never settled: the figure is not a steady-state time."]
    return "\n".join(lines) + "\n"


def save(bench: str, results: list[Result], extra: dict | None = None,
         out_dir: str | None = None) -> tuple[str, str]:
    """Write ``<out_dir>/<machine-tag>-<bench>.json`` and ``.md``; append to ``history.csv``."""
    out_dir = out_dir or os.environ.get("REGIONMED_BENCH_OUT") or RESULTS_DIR
    os.makedirs(out_dir, exist_ok=True)
    tag = machine_tag()
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    payload = {"bench": bench, "time": stamp, "machine": machine_info(),
               "results": [asdict(r) for r in results], **(extra or {})}
    base = os.path.join(out_dir, f"{tag}-{bench}")
    with open(base + ".json", "w") as fh:
        json.dump(payload, fh, indent=2, default=str)
    with open(base + ".md", "w") as fh:
        fh.write(f"# {bench} on {tag}\n\n{stamp}, torch {torch.__version__}\n\n")
        fh.write(markdown_table(results))
    hist = os.path.join(out_dir, "history.csv")
    new = not os.path.exists(hist)
    with open(hist, "a", newline="") as fh:
        w = csv.writer(fh)
        if new:
            w.writerow(["time", "machine", "bench", "group", "case", "median_ms", "peak_mem_mb"])
        for r in results:
            w.writerow([stamp, tag, bench, r.group, r.name, f"{r.median_ms:.4f}", f"{r.peak_mem_mb:.2f}"])
    return base + ".json", base + ".md"


class _Parser(argparse.ArgumentParser):
    """With ``REGIONMED_BENCH_DRY=1`` in the environment, exits (status 0) right after a
    successful parse: ``run_all.py --dry-run`` checks a bench's command line without running it."""

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        ns = super().parse_args(args, namespace)
        if os.environ.get("REGIONMED_BENCH_DRY") == "1":
            raise SystemExit(0)
        return ns


def common_args(description: str) -> argparse.ArgumentParser:
    """Arguments every benchmark script takes: ``--quick``, ``--device``, ``--repeats``, ``--out``."""
    p = _Parser(description=description)
    p.add_argument("--quick", action="store_true", help="small sizes, few repeats (CI smoke run)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    return p
