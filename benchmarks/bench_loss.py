"""Benchmark of the chunked CLIP loss, forward + backward, against open_clip.ClipLoss.

Cases, side by side in one run, per batch size B (N = M = B, D = 512):
``open_clip.ClipLoss`` (the baseline), ``reference`` (plain PyTorch, full logits), ours with
``backend="auto"`` (what a user gets), ours forced onto each of auto's two paths (``torch-full``:
the whole logits; ``cpu`` tiles on a CPU, ``triton`` on a GPU) so the crossover between them
shows, and on a GPU ``inf_cl`` when it is importable. Gradients flow to both embeddings and to
the (learnable, exponentiated) logit scale. Cases whose full logits would not fit are left out
(full-logits cases above ``FULL_MAX_B``); the forced tiled case is left out where auto already
takes it (the same code).

Floor: the math needs four B x B x D matrix products (one forward, three backward with
recomputation); ``img @ txt.T`` of the same size is timed in the same run and the floor is
4x that. Ratios: ``speedup vs open_clip`` (baseline time / case time), ``memory vs
open_clip`` (case / baseline extra peak memory) and ``time / floor``.

    python benchmarks/bench_loss.py [--quick] [--device cpu|cuda] [--sizes 128,1024,65536]
"""
from __future__ import annotations

import math
import os
import statistics
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import runner  # noqa: E402

from regionmed_fast.errors import require  # noqa: E402
from regionmed_fast.ops import chunked_clip_loss  # noqa: E402
from regionmed_fast.ops.loss import FULL_LOGITS_MAX  # noqa: E402
from regionmed_fast.ops.loss_reference import clip_loss_reference  # noqa: E402

BASELINE = "open_clip.ClipLoss"
FULL = "ours-torch-full (forced)"
TILED = "ours-{} (tiled)"
#: Largest B whose full-logits cases run, per device: open_clip keeps ~4 copies of the
#: B x B fp32 logits (16 GiB at 32768), more than this machine's memory beside the rest.
FULL_MAX_B = {"cpu": 16384, "cuda": 32768}
#: Largest B of the forced torch-full case (auto leaves it at 2048 on a CPU, 4096 on a GPU)
FORCED_FULL_MAX_B = {"cpu": 8192, "cuda": 16384}


def _exact_cpu_peaks() -> None:
    """Make glibc return every block over 128 KiB to the OS when it is freed.

    The runner reads the CPU peak from the resident set; glibc otherwise raises its mmap
    threshold (up to 32 MiB) after big frees and keeps those pages, so a case would reuse the
    previous case's pages and show a peak of 0.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except Exception:
        pass


def _inf_cl():
    try:
        from inf_cl import cal_inf_loss
    except Exception as exc:  # not installed, or no GPU build
        return None, f"{type(exc).__name__}: {exc}"
    import tempfile

    import torch.distributed as dist

    # inf_cl's backward all-reduces over the default group even on one GPU: give it a
    # one-process group (its loss is then the single-GPU Inf-CL loss).
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, init_method=f"file://{tempfile.mktemp()}", rank=0,
                                world_size=1)

    def loss(x, y, scale):
        # inf_cl computes one direction per call; CLIP's loss is the mean of both
        return 0.5 * (cal_inf_loss(x, y, scale=scale) + cal_inf_loss(y, x, scale=scale))

    return loss, ""


def impls(device: str, forced: str):
    open_clip = require("open_clip", extra="test", purpose="bench_loss (its baseline open_clip.ClipLoss)",
                        pip_name="open-clip-torch")
    clip = open_clip.loss.ClipLoss()
    out = [
        (BASELINE, lambda x, y, s: clip(x, y, s)),
        ("reference", lambda x, y, s: clip_loss_reference(x, y, s)),
        ("ours-auto", lambda x, y, s: chunked_clip_loss(x, y, s)),
        (FULL, lambda x, y, s: chunked_clip_loss(x, y, s, backend="torch-full")),
    ]
    if forced == "triton":  # auto is already triton: force a small backward buffer instead
        out.append(("ours-triton (1024-row chunks)",
                    lambda x, y, s: chunked_clip_loss(x, y, s, backend="triton", chunk_size=(1024, 1))))
    else:
        out.append((TILED.format(forced),
                    lambda x, y, s: chunked_clip_loss(x, y, s, backend=forced, chunk_size=_forced_tile())))
    if device == "cuda":
        fn, why = _inf_cl()
        if fn is not None:
            out.append(("inf_cl", fn))
        else:
            print(f"  (skipping inf_cl: {why})")
    return out


def _forced_tile():
    from regionmed_fast.ops.loss_cpu import DEFAULT_TILE

    return DEFAULT_TILE


#: Above this many bytes of logits the floor's GEMM runs in row blocks into one reused buffer:
#: the whole B x B output (16 GiB at B = 65536) would not fit beside the rest.
FLOOR_WHOLE_BYTES = 2**30


def gemm_floor_ms(x: torch.Tensor, y: torch.Tensor, device: str, repeats: int) -> float:
    """4 x the median time of ``x @ y.T`` (the logits GEMM) measured now; the same FLOPs in
    row blocks where the whole output would exceed ``FLOOR_WHOLE_BYTES``."""
    fn = lambda: x @ y.T  # noqa: E731
    if x.shape[0] * y.shape[0] * x.element_size() > FLOOR_WHOLE_BYTES:
        rows = max(1, FLOOR_WHOLE_BYTES // 8 // (y.shape[0] * x.element_size()))
        buf = torch.empty(rows, y.shape[0], dtype=x.dtype, device=x.device)

        def fn():
            for r0 in range(0, x.shape[0], rows):
                r1 = min(r0 + rows, x.shape[0])
                torch.mm(x[r0:r1], y.T, out=buf[: r1 - r0])
    times = runner.time_fn(fn, device, warmup=1, repeats=repeats, max_seconds=20)
    return 4 * statistics.median(times)


def cases_for(B: int, D: int, dtype: torch.dtype, device: str, forced: str, repeats: int,
              skip: set[str]):
    gen = torch.Generator().manual_seed(0)
    x0 = torch.nn.functional.normalize(torch.randn(B, D, generator=gen), dim=1).to(device, dtype)
    y0 = torch.nn.functional.normalize(torch.randn(B, D, generator=gen), dim=1).to(device, dtype)
    dname = str(dtype).replace("torch.", "")
    group = f"fwd+bwd B={B} D={D} {dname}"
    floor = gemm_floor_ms(x0, y0, device, repeats)
    print(f"  {group}: floor 4 x (img @ txt.T) = {floor:.1f} ms", flush=True)
    cases = []
    for label, fn in impls(device, forced):
        if label in skip:
            continue
        x = x0.clone().requires_grad_(True)
        y = y0.clone().requires_grad_(True)
        p = torch.tensor(math.log(1 / 0.07), device=device).requires_grad_(True)

        def call(fn=fn, x=x, y=y, p=p):
            loss = fn(x, y, p.exp())
            return torch.autograd.grad(loss, (x, y, p))

        if device == "cuda" and label not in (BASELINE, "reference"):
            # Triton compiles and autotunes on the first call (its do_bench allocates a 256 MB
            # cache-flush buffer): keep that out of the measured peak
            call()
        cases.append(runner.Case(label, call, group=group, device=device,
                                 meta={"B": B, "D": D, "dtype": dname, "size": B}))
    return cases, {group: BASELINE}, {group: floor}


def _left_out(B: int, dtype: torch.dtype, device: str, forced: str) -> set[str]:
    """The cases that would not fit at this B, and the forced tiled case where auto is it."""
    out = set()
    if B > FULL_MAX_B[device] or (device == "cuda" and B * B * dtype.itemsize > 8 * 2**30):
        out |= {BASELINE, "reference"}
    elif device == "cuda" and B >= 32768 or device == "cpu" and B > 8192:
        out |= {"reference"}  # the same full-logits math as open_clip, more memory
    if B > FORCED_FULL_MAX_B[device]:
        out.add(FULL)
    if forced == "cpu" and B * B > FULL_LOGITS_MAX["cpu"]:
        out.add(TILED.format(forced))  # auto's own path here
    return out


def main(argv: list[str] | None = None) -> int:
    p = runner.common_args(__doc__.split("\n")[0])
    p.add_argument("--sizes", default=None, help="comma-separated batch sizes (default per device)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for CPU runs")
    p.add_argument("--skip", default="", help="comma-separated case names to leave out (e.g. reference)")
    args = p.parse_args(argv)
    device = args.device
    if device == "cpu":
        _exact_cpu_peaks()
    if args.threads:
        torch.set_num_threads(args.threads)
    if device == "cuda":
        forced = "triton"
        default = "16384,65536" if args.quick else "4096,16384,32768,65536"
        dtypes = [torch.bfloat16] if args.quick else [torch.float32, torch.bfloat16]
    else:
        forced = "cpu"
        default = "128,512,2048" if args.quick else "128,256,512,1024,2048,4096,8192,16384,32768,65536"
        dtypes = [torch.float32]
    sizes = [int(s) for s in (args.sizes or default).split(",")]
    repeats = 3 if args.quick else args.repeats
    load = os.getloadavg()
    print(f"bench_loss on {runner.machine_tag()}: threads {torch.get_num_threads()}, load {load}")
    results = []
    for dtype in dtypes:
        for B in sizes:
            skip = {n for n in args.skip.split(",") if n} | _left_out(B, dtype, device, forced)
            cases, baselines, floors = cases_for(B, args.dim, dtype, device, forced, repeats, skip)
            big = device == "cpu" and B >= 8192  # a call takes seconds: the memory call warms up
            results += runner.run_cases(cases, warmup=0 if big else 1, repeats=repeats,
                                        max_seconds=10 if args.quick else 30,
                                        baselines=baselines, floors=floors)
            # saved after every size: a run stopped at B = 65536 keeps the smaller sizes
            extra = {"quick": args.quick, "load_avg_start": load, "load_avg_end": os.getloadavg(),
                     "size_label": "batch size B (N = M)",
                     "floor": "4 x time of img @ txt.T, same run (in row blocks above 1 GiB of logits)"}
            json_path, md_path = runner.save("loss", results, extra, out_dir=args.out)
    print(runner.markdown_table(results, "bench_loss"))
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
