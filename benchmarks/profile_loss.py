"""Where the triton loss backend's time goes on a GPU: each phase of fwd+bwd against its floor.

For B x B logits (N = M = B) and embedding width D, in bf16 (and fp32 for one size), it times
with CUDA events (``triton.testing.do_bench``, median):

* ``gemm``: ``img @ txt.T`` through cuBLAS, the unit of the 4-GEMM floor (``bench_loss``);
* ``stats``: the forward kernel (both directions' log-sum-exps in one pass) alone;
* ``grad kernel``: the backward's logits recomputation + ``G`` write, per row chunk, alone;
* ``grad gemms``: the two cuBLAS products ``G @ Y`` and ``G.T @ X`` on a ``G`` of that size;
* ``fwd+bwd``: the public op, as ``bench_loss`` times it;
* ``open_clip``: ``open_clip.ClipLoss`` fwd+bwd when installed;

and records the autotuner's choice for each kernel. The phases add up to about the op's time;
each is also given over its own GEMM-equivalent floor, so the largest gap is the one to work on.

    python benchmarks/profile_loss.py [--sizes 16384,65536] [--dims 256,512,768,1024] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import runner  # noqa: E402


def _bench(fn) -> float:
    if not torch.cuda.is_available():  # the CPU smoke run (TRITON_INTERPRET=1): one timed call
        import time

        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))


def _best(kernel) -> str:
    cfg = getattr(kernel, "best_config", None)
    return str(cfg) if cfg is not None else "(not tuned)"


DEV = "cuda" if torch.cuda.is_available() else "cpu"


def profile_one(b: int, d: int, dtype: torch.dtype) -> dict:
    from regionmed_fast.kernels import loss as K
    from regionmed_fast.ops import chunked_clip_loss

    g = torch.Generator(device=DEV).manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(b, d, device=DEV, generator=g), dim=1).to(dtype)
    y = torch.nn.functional.normalize(torch.randn(b, d, device=DEV, generator=g), dim=1).to(dtype)
    scale = torch.tensor(100.0, device=DEV)  # logit_scale at its clamp: the widest logits
    row: dict = {"B": b, "D": d, "dtype": str(dtype).replace("torch.", "")}
    row["gemm_ms"] = _bench(lambda: x @ y.T)
    row["stats_ms"] = _bench(lambda: K.softmax_stats(x, y, scale, None, None, 0.0, None))
    row["stats_config"] = _best(K._softmax_stats)
    rows, cols = K.softmax_stats(x, y, scale, None, None, 0.0, None)
    chunk = K._chunk_rows(None, b, b, x.element_size())
    gbuf = torch.empty(chunk, b, dtype=dtype, device=DEV)
    rs, cs = rows.contiguous(), cols.contiguous()
    sc = K._f32(scale)
    prec = K._check(x, y)
    dummy = torch.zeros(1, dtype=torch.int64, device=DEV)
    n_chunks = -(-b // chunk)

    def grad_kernel():
        grid = lambda meta: (triton_cdiv(chunk, meta["BN"]), triton_cdiv(b, meta["BM"]))  # noqa: E731
        K._softmax_grad[grid](x[:chunk], y, sc, dummy, dummy, rs[:, :chunk].contiguous(), cs, gbuf, chunk, b, d,
                              0.0, x.stride(0), y.stride(0), chunk, HARD=False, PREC=prec, **K._FIXED_BWD)

    row["chunk_rows"], row["chunks"] = chunk, n_chunks
    row["grad_kernel_ms"] = _bench(grad_kernel) * n_chunks
    row["grad_config"] = _best(K._softmax_grad)
    gbuf.normal_()
    row["grad_gemms_ms"] = _bench(lambda: (gbuf @ y, gbuf.T @ x[:chunk])) * n_chunks
    xs = x.detach().clone().requires_grad_(True)
    ys = y.detach().clone().requires_grad_(True)
    ls = torch.tensor(4.6, device=DEV, requires_grad=True)

    def ours():
        loss = chunked_clip_loss(xs, ys, ls.exp(), backend="triton")
        loss.backward()

    row["fwd_bwd_ms"] = _bench(ours)
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()
        ours()
        torch.cuda.synchronize()
        row["fwd_bwd_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        row["fwd_bwd_peak_mib"] = float("nan")
    try:
        import open_clip

        crit = open_clip.ClipLoss()

        def oc():
            crit(xs, ys, ls.exp()).backward()

        row["open_clip_ms"] = _bench(oc)
    except Exception as exc:  # not installed there, or out of memory at this size
        row["open_clip_ms"] = None
        row["open_clip_note"] = f"{type(exc).__name__}: {str(exc)[:120]}"
        torch.cuda.empty_cache()
    floor = 4 * row["gemm_ms"]
    row["floor_ms"] = floor
    row["phases_ms"] = row["stats_ms"] + row["grad_kernel_ms"] + row["grad_gemms_ms"]
    row["x_floor"] = row["fwd_bwd_ms"] / floor
    # each phase over the GEMMs it must do: stats 1, grad kernel 1 (recompute), grad gemms 2
    row["stats_x_gemm"] = row["stats_ms"] / row["gemm_ms"]
    row["grad_kernel_x_gemm"] = row["grad_kernel_ms"] / row["gemm_ms"]
    row["grad_gemms_x_gemm"] = row["grad_gemms_ms"] / (2 * row["gemm_ms"])
    return row


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def markdown(rows: list[dict]) -> str:
    head = ("| B | D | dtype | gemm | stats (x gemm) | grad kernel (x gemm) | grad gemms (x 2 gemm) | "
            "phases | fwd+bwd (x floor) | open_clip | peak MiB |")
    lines = [head, "| " + " | ".join(["---:"] * 11) + " |"]
    for r in rows:
        oc = f"{r['open_clip_ms']:.2f}" if r.get("open_clip_ms") else "-"
        lines.append(
            f"| {r['B']} | {r['D']} | {r['dtype']} | {r['gemm_ms']:.3f} | {r['stats_ms']:.3f} ({r['stats_x_gemm']:.2f}) "
            f"| {r['grad_kernel_ms']:.3f} ({r['grad_kernel_x_gemm']:.2f}) | {r['grad_gemms_ms']:.3f} "
            f"({r['grad_gemms_x_gemm']:.2f}) | {r['phases_ms']:.2f} | {r['fwd_bwd_ms']:.2f} ({r['x_floor']:.2f}) "
            f"| {oc} | {r['fwd_bwd_peak_mib']:.0f} |")
    lines.append("")
    for r in rows:
        lines.append(f"- B={r['B']} D={r['D']} {r['dtype']}: stats {r['stats_config']}; grad {r['grad_config']}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="16384,65536")
    p.add_argument("--dims", default="256,512,768,1024", help="widths timed at the first size")
    p.add_argument("--out", default=os.environ.get("RESULTS", os.path.join(HERE, "results")))
    args = p.parse_args(argv)
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        print("profile_loss: needs a CUDA GPU (or TRITON_INTERPRET=1 for a tiny CPU smoke run)")
        return 2
    sizes = [int(s) for s in args.sizes.split(",") if s]
    dims = [int(s) for s in args.dims.split(",") if s]
    plan = [(b, 512, torch.bfloat16) for b in sizes]
    plan += [(sizes[0], d, torch.bfloat16) for d in dims if d != 512]
    plan += [(sizes[0], 512, torch.float32)]
    rows = []
    for b, d, dt in plan:
        try:
            rows.append(profile_one(b, d, dt))
            r = rows[-1]
            print(f"B={b} D={d} {dt}: fwd+bwd {r['fwd_bwd_ms']:.2f} ms = {r['x_floor']:.2f}x floor; stats "
                  f"{r['stats_ms']:.2f}, grad kernel {r['grad_kernel_ms']:.2f}, grad gemms {r['grad_gemms_ms']:.2f}, "
                  f"gemm {r['gemm_ms']:.3f}", flush=True)
        except Exception as exc:  # report and go on with the next shape
            print(f"B={b} D={d} {dt}: FAILED {type(exc).__name__}: {exc}", flush=True)
        torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    tag = runner.machine_tag()
    payload = {"machine": runner.machine_info(), "rows": rows}
    with open(os.path.join(args.out, f"{tag}-loss-phases.json"), "w") as f:
        json.dump(payload, f, indent=1)
    with open(os.path.join(args.out, f"{tag}-loss-phases.md"), "w") as f:
        f.write(f"# loss phases on {tag}\n\n" + markdown(rows))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
