"""Run every benchmark (or a chosen subset) and gather the results in one place.

    python benchmarks/run_all.py [--quick] [--only loss,roi,data,train] [--device cuda] [--readme]
    python benchmarks/run_all.py --readme-only    # re-render README.md's tables from the results
    python benchmarks/run_all.py --only train --timeout train=240 --args train="--batch 64"
    python benchmarks/run_all.py --dry-run ...    # check every bench accepts its arguments; run nothing

Each ``bench_<name>.py`` runs in its own process (so one failure or one allocator's state does
not leak into the next), writes ``<out>/<machine-tag>-<name>.json`` through the shared runner,
and this script then writes ``<out>/<machine-tag>.json`` (machine, versions, every figure),
``<out>/<machine-tag>.md`` (the tables, which the README's performance section is made from)
and PNG plots of time and memory for each benchmark that swept a size; benches already in an
existing ``<machine-tag>.json`` there and not run this time are kept (so several calls with
``--only``, as ``gpu_check.sh`` makes them, add up to one summary). With ``--readme`` the
tables in README.md's performance section are then rendered again from every machine's results
(``readme_perf.py``).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import readme_perf  # noqa: E402
import runner  # noqa: E402

BENCHES = ("loss", "roi", "data", "train")


def _plot(name: str, payload: dict, out_dir: str, tag: str) -> list[str]:
    """Time and peak memory of each case against the swept size (meta key ``size``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return []
    series: dict[str, list[tuple[float, float, float]]] = {}
    for r in payload.get("results", []):
        size = r.get("meta", {}).get("size")
        if size is None or r.get("error"):
            continue
        series.setdefault(r["name"], []).append((float(size), r["median_ms"], r["peak_mem_mb"]))
    if not any(len(v) > 1 for v in series.values()):
        return []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for case, pts in sorted(series.items()):
        pts.sort()
        xs = [p[0] for p in pts]
        axes[0].plot(xs, [p[1] for p in pts], marker="o", label=case)
        axes[1].plot(xs, [p[2] for p in pts], marker="o", label=case)
    for ax, ylabel in zip(axes, ("median time (ms)", "extra peak memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(payload.get("size_label", "size"))
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"bench_{name} on {tag}")
    fig.tight_layout()
    path = os.path.join(out_dir, f"{tag}-{name}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def run_limited(cmd: list[str], limit: float) -> int | None:
    """Run ``cmd``; past ``limit`` seconds stop it and everything it started (loader workers,
    compile workers, child processes) and return None, else its exit code."""
    proc = subprocess.Popen(cmd, start_new_session=True)
    try:
        return proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
        return None


def per_bench(values: list[str], what: str, default: str | None = None) -> dict[str, str]:
    """``["train=240", "300"]`` -> ``{"train": "240", "*": "300"}`` (a bare value is the default)."""
    out = {} if default is None else {"*": default}
    for v in values:
        for part in ([v] if what == "args" else v.split(",")):
            name, eq, val = part.partition("=")
            if not eq:
                out["*"] = part
            elif name not in BENCHES:
                raise SystemExit(f"run_all: --{what} {part!r}: unknown benchmark {name!r}; "
                                 f"choose from {BENCHES}")
            else:
                out[name] = val
    return out


def dry_run(chosen: list[str], commands: dict[str, list[str]]) -> int:
    """Import each bench and parse its command line as a run would, then stop (runner's
    parser exits after parsing when REGIONMED_BENCH_DRY is set): wrong or missing flags show
    here, without a GPU and without running anything."""
    was = os.environ.get("REGIONMED_BENCH_DRY")
    os.environ["REGIONMED_BENCH_DRY"] = "1"
    try:
        return _dry_run(chosen, commands)
    finally:
        if was is None:
            del os.environ["REGIONMED_BENCH_DRY"]
        else:
            os.environ["REGIONMED_BENCH_DRY"] = was


def _dry_run(chosen: list[str], commands: dict[str, list[str]]) -> int:
    import importlib

    bad = 0
    for name in chosen:
        argv = commands[name][2:]
        old = sys.argv
        sys.argv = [commands[name][1], *argv]
        try:
            mod = importlib.import_module(f"bench_{name}")
            try:
                mod.main(argv) if mod.main.__code__.co_argcount else mod.main()
                status = "ok"
            except SystemExit as exc:
                status = "ok" if exc.code in (0, None) else f"exit {exc.code}"
        except Exception as exc:
            status = f"{type(exc).__name__}: {exc}"
        finally:
            sys.argv = old
        bad += status != "ok"
        print(f"== dry run bench_{name} {' '.join(argv)}: {status}", flush=True)
    return 1 if bad else 0


def render_study() -> None:
    """The study's blocks in README.md and docs/evaluation.md, from its results file."""
    from regionmed_fast.apps import study_report

    changed = study_report.update_docs(os.path.dirname(HERE))
    print(f"study blocks: {', '.join(changed) or 'already up to date'} "
          f"(from {study_report.RESULTS_JSON})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats")
    p.add_argument("--only", default=",".join(BENCHES), help="comma-separated subset of " + ",".join(BENCHES))
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--timeout", action="append", default=[], metavar="[NAME=]SECONDS[,...]",
                   help="seconds a benchmark may run before it is stopped (default 1800); "
                        "NAME=SECONDS for one benchmark")
    p.add_argument("--args", action="append", default=[], metavar="NAME=ARGS",
                   help='extra arguments for one benchmark, e.g. --args data="--workers 16"')
    p.add_argument("--dry-run", action="store_true",
                   help="check that every chosen benchmark accepts its arguments; run nothing")
    p.add_argument("--readme", action="store_true", help="afterwards, re-render README.md's performance tables")
    p.add_argument("--readme-only", action="store_true", help="only re-render README.md's tables; run nothing")
    args = p.parse_args(argv)
    out_dir = os.path.abspath(args.out or runner.RESULTS_DIR)
    readme = os.path.join(os.path.dirname(HERE), "README.md")
    if args.readme_only:
        changed = readme_perf.update_readme(readme, out_dir)
        print(f"{readme}: {'tables rendered again' if changed else 'already up to date'} from {out_dir}")
        render_study()
        return 0
    os.makedirs(out_dir, exist_ok=True)
    tag = runner.machine_tag()
    chosen = [b.strip() for b in args.only.split(",") if b.strip()]
    unknown = [b for b in chosen if b not in BENCHES]
    if unknown:
        p.error(f"--only: unknown benchmark(s) {unknown}; choose from {BENCHES}")
    timeouts = per_bench(args.timeout, "timeout", "1800")
    extra_args = per_bench(args.args, "args")
    commands = {}
    for name in chosen:
        cmd = [sys.executable, os.path.join(HERE, f"bench_{name}.py"), "--out", out_dir]
        if args.quick:
            cmd.append("--quick")
        if args.device:
            cmd += ["--device", args.device]
        commands[name] = cmd + shlex.split(extra_args.get(name, ""))
    if args.dry_run:
        return dry_run(chosen, commands)
    summary = {"machine": runner.machine_info(), "benches": {}}
    old_summary = os.path.join(out_dir, f"{tag}.json")
    if os.path.exists(old_summary):
        with open(old_summary) as fh:
            summary["benches"] = {k: v for k, v in json.load(fh).get("benches", {}).items()
                                  if k not in chosen}
    for name in chosen:
        cmd = commands[name]
        limit = float(timeouts.get(name, timeouts["*"]))
        print(f"== bench_{name}: {' '.join(cmd)} (limit {limit:.0f} s)", flush=True)
        t0 = time.time()
        rc = run_limited(cmd, limit)
        status = f"timed out after {limit:.0f} s" if rc is None else ("ok" if rc == 0 else f"exit {rc}")
        wall = time.time() - t0
        print(f"== bench_{name}: {status} in {wall:.1f} s", flush=True)
        result_json = os.path.join(out_dir, f"{tag}-{name}.json")
        entry = {"status": status, "wall_s": round(wall, 1)}
        if os.path.exists(result_json) and os.path.getmtime(result_json) >= t0:
            with open(result_json) as fh:
                payload = json.load(fh)
            entry["results"] = payload.get("results", [])
            entry["plots"] = _plot(name, payload, out_dir, tag)
        summary["benches"][name] = entry
    md = [f"# Benchmarks on {tag}", "", f"machine: `{json.dumps(summary['machine'])}`", ""]
    for name in [b for b in BENCHES if b in summary["benches"]]:
        entry = summary["benches"][name]
        bench_md = os.path.join(out_dir, f"{tag}-{name}.md")
        if "results" in entry and os.path.exists(bench_md):
            with open(bench_md) as fh:
                md.append(fh.read().split("\n", 3)[-1])
        else:
            md.append(f"### bench_{name}\n\n{entry['status']}: no results written\n")
    with open(os.path.join(out_dir, f"{tag}.json"), "w") as fh:
        json.dump(summary, fh, indent=2, default=str)
    with open(os.path.join(out_dir, f"{tag}.md"), "w") as fh:
        fh.write("\n".join(md) + "\n")
    print(f"wrote {out_dir}/{tag}.json and {tag}.md")
    if args.readme:
        readme_perf.update_readme(readme, out_dir)
        print(f"rendered the performance tables of {readme} again")
        render_study()
    return 0 if all(summary["benches"][n]["status"] == "ok" for n in chosen) else 1


if __name__ == "__main__":
    sys.exit(main())
