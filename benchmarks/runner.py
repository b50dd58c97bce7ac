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


def time_fn(fn: Callable[[], object], device: str, warmup: int, repeats: int,
            max_seconds: float) -> list[float]:
    """Wall times in ms of ``repeats`` calls after ``warmup`` calls (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times: list[float] = []
    start_all = time.perf_counter()
    for _ in range(repeats):
        if device.startswith("cuda"):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() - start_all > max_seconds and len(times) >= 3:
            break
    return times


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
        try:
            mem = peak_memory_mb(case.fn, case.device) if memory else float("nan")
            times = time_fn(case.fn, case.device, warmup, repeats, max_seconds)
            res = Result(case.name, case.group, case.device, statistics.median(times), min(times),
                         max(times), len(times), mem, case.meta)
        except Exception as exc:  # a baseline that cannot run here is reported, not fatal
            res = Result(case.name, case.group, case.device, float("nan"), float("nan"),
                         float("nan"), 0, float("nan"), case.meta, error=f"{type(exc).__name__}: {exc}")
        results.append(res)
        if verbose:
            if res.error:
                print(f"  {case.group:<28} {case.name:<30} ERROR {res.error[:120]}", flush=True)
            else:
                print(f"  {case.group:<28} {case.name:<30} {res.median_ms:10.2f} ms "
                      f"(min {res.min_ms:.2f}, max {res.max_ms:.2f}, n={res.repeats})  "
                      f"peak +{res.peak_mem_mb:.1f} MiB", flush=True)
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
    lines += ["| group | case | median ms | min ms | max ms | peak MiB | ratios |",
              "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for r in results:
        ratios = "; ".join(f"{k} {v:.2f}x" if "floor" not in k else f"{k} {v:.2f}"
                           for k, v in r.ratios.items())
        if r.error:
            lines.append(f"| {r.group} | {r.name} | error | | | | {r.error[:80]} |")
        else:
            lines.append(f"| {r.group} | {r.name} | {r.median_ms:.2f} | {r.min_ms:.2f} | "
                         f"{r.max_ms:.2f} | {r.peak_mem_mb:.1f} | {ratios} |")
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


def common_args(description: str) -> argparse.ArgumentParser:
    """Arguments every benchmark script takes: ``--quick``, ``--device``, ``--repeats``, ``--out``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small sizes, few repeats (CI smoke run)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    return p
