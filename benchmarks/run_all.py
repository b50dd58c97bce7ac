"""Run every benchmark (or a chosen subset) and gather the results in one place.

    python benchmarks/run_all.py [--quick] [--only loss,roi,data,train] [--device cuda] [--readme]
    python benchmarks/run_all.py --readme-only    # re-render README.md's tables from the results

Each ``bench_<name>.py`` runs in its own process (so one failure or one allocator's state does
not leak into the next), writes ``<out>/<machine-tag>-<name>.json`` through the shared runner,
and this script then writes ``<out>/<machine-tag>.json`` (machine, versions, every figure),
``<out>/<machine-tag>.md`` (the tables, which the README's performance section is made from)
and PNG plots of time and memory for each benchmark that swept a size. With ``--readme`` the
tables in README.md's performance section are then rendered again from every machine's results
(``readme_perf.py``).
"""
from __future__ import annotations

import argparse
import json
import os
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats")
    p.add_argument("--only", default=",".join(BENCHES), help="comma-separated subset of " + ",".join(BENCHES))
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per benchmark before it is stopped")
    p.add_argument("--readme", action="store_true", help="afterwards, re-render README.md's performance tables")
    p.add_argument("--readme-only", action="store_true", help="only re-render README.md's tables; run nothing")
    args = p.parse_args(argv)
    out_dir = os.path.abspath(args.out or runner.RESULTS_DIR)
    readme = os.path.join(os.path.dirname(HERE), "README.md")
    if args.readme_only:
        changed = readme_perf.update_readme(readme, out_dir)
        print(f"{readme}: {'tables rendered again' if changed else 'already up to date'} from {out_dir}")
        return 0
    os.makedirs(out_dir, exist_ok=True)
    tag = runner.machine_tag()
    chosen = [b.strip() for b in args.only.split(",") if b.strip()]
    unknown = [b for b in chosen if b not in BENCHES]
    if unknown:
        p.error(f"--only: unknown benchmark(s) {unknown}; choose from {BENCHES}")
    summary = {"machine": runner.machine_info(), "benches": {}}
    md = [f"# Benchmarks on {tag}", "", f"machine: `{json.dumps(summary['machine'])}`", ""]
    for name in chosen:
        cmd = [sys.executable, os.path.join(HERE, f"bench_{name}.py"), "--out", out_dir]
        if args.quick:
            cmd.append("--quick")
        if args.device:
            cmd += ["--device", args.device]
        print(f"== bench_{name}: {' '.join(cmd)}", flush=True)
        t0 = time.time()
        try:
            proc = subprocess.run(cmd, timeout=args.timeout)
            status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
        except subprocess.TimeoutExpired:
            status = f"timed out after {args.timeout:.0f} s"
        wall = time.time() - t0
        print(f"== bench_{name}: {status} in {wall:.1f} s", flush=True)
        result_json = os.path.join(out_dir, f"{tag}-{name}.json")
        entry = {"status": status, "wall_s": round(wall, 1)}
        if os.path.exists(result_json) and os.path.getmtime(result_json) >= t0:
            with open(result_json) as fh:
                payload = json.load(fh)
            entry["results"] = payload.get("results", [])
            entry["plots"] = _plot(name, payload, out_dir, tag)
            with open(os.path.join(out_dir, f"{tag}-{name}.md")) as fh:
                md.append(fh.read().split("\n", 3)[-1])
        else:
            md.append(f"### bench_{name}\n\n{status}: no results written\n")
        summary["benches"][name] = entry
    with open(os.path.join(out_dir, f"{tag}.json"), "w") as fh:
        json.dump(summary, fh, indent=2, default=str)
    with open(os.path.join(out_dir, f"{tag}.md"), "w") as fh:
        fh.write("\n".join(md) + "\n")
    print(f"wrote {out_dir}/{tag}.json and {tag}.md")
    if args.readme:
        readme_perf.update_readme(readme, out_dir)
        print(f"rendered the performance tables of {readme} again")
    return 0 if all(e["status"] == "ok" for e in summary["benches"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
