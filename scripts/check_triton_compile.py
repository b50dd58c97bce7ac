"""Compiles the Triton kernels (kernels/roi.py, kernels/loss.py) for a GPU target without a GPU.

The interpreter (TRITON_INTERPRET=1) checks what the kernels compute but not whether they
compile: this script lowers every kernel through Triton's real pipeline (TTIR -> TTGIR -> LLVM ->
PTX -> cubin with Triton's bundled ptxas) for sm_90, in each dtype / layout / tuning config, and
prints registers, spills and shared memory. About 1 s per variant.

    python scripts/check_triton_compile.py [--arch 90] [--ops roi,loss]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # must be unset before triton is imported
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from regionmed_fast.kernels import loss as L  # noqa: E402
from regionmed_fast.kernels import roi as R  # noqa: E402

SCALARS = {"scale_hi": "fp32", "scale_lo": "fp32", "sampling_ratio": "i32", "aligned": "i32", "B": "i32", "C": "i32",
           "H": "i32", "W": "i32", "s_b": "i32", "s_c": "i32", "s_y": "i32", "s_x": "i32"}


def ptxas_stats(ptx: str, arch: str) -> str:
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        return "(no ptxas)"
    target = re.search(r"\.target\s+(\S+)", ptx)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        out = subprocess.run([ptxas, f"-arch={target.group(1) if target else 'sm_' + arch}", "-v", f.name,
                              "-o", os.devnull], capture_output=True, text=True).stderr
    finally:
        os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores", out)
    return f"regs={regs.group(1) if regs else '?'} spill_bytes={spill.group(1) if spill else '?'}"


def _aligned(fn, sig: dict, ints: tuple[str, ...] = ()) -> dict:
    """The divisibility a launch specialises on (pointers from torch's allocator and integer
    arguments that are multiples of 16): without it Triton cannot vectorise the loads and does
    not software-pipeline them, so the report would not be what runs."""
    return {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
            if sig.get(a, "").startswith("*") or a in ints}


def _compile(fn, sig: dict, consts: dict, cfg, label: str, target, arch: str, ints: tuple[str, ...] = ()) -> int:
    """Compiles one variant and prints its resources; returns 1 when it fails."""
    try:
        src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=_aligned(fn, sig, ints))
        k = triton.compile(src, target=target,
                           options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
        ptx = k.asm["ptx"]
        print(f"ok   {label} {ptxas_stats(ptx, arch)} smem={k.metadata.shared} "
              f"wgmma={int('wgmma.mma_async' in ptx)} cp.async={int('cp.async' in ptx)}", flush=True)
        return 0
    except Exception as exc:  # report every failing variant, then fail
        print(f"FAIL {label}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}", flush=True)
        return 1


LOSS_SCALARS = {"n": "i32", "m": "i32", "d": "i32", "beta": "fp32", "sxn": "i32", "syn": "i32",
                "nblocks": "i32", "n_key": "i32", "total_n": "i32", "coef": "fp32"}


def loss_variants(target, arch: str) -> int:
    """Every loss kernel in each input dtype and config (fp32 inputs use tf32x3 dots)."""
    failures = 0
    for dt in ("bf16", "fp16", "fp32"):
        prec = "tf32x3" if dt == "fp32" else None
        for fwd in (L._softmax_stats, L._sigmoid_sum, L._softmax_grad, L._sigmoid_grad):
            fn = fwd.fn
            names = fn.arg_names
            for hard in ((False, True) if "HARD" in names else (None,)):
                for cfg in fwd.configs:
                    c = {"PREC": prec, **cfg.kwargs}
                    if hard is not None:
                        c["HARD"] = hard
                    if "BN" not in c:
                        c["BN"] = L.FWD_BN
                    sig = {}
                    for a in names:
                        if a in c:
                            sig[a] = "constexpr"
                        elif a in ("X", "Y"):
                            sig[a] = f"*{dt}"
                        elif a == "G":
                            sig[a] = f"*{dt}"
                        elif a in ("GI", "GT"):
                            sig[a] = "*i64"
                        elif a in LOSS_SCALARS:
                            sig[a] = LOSS_SCALARS[a]
                        else:
                            sig[a] = "*fp32"
                    tiles = " ".join(f"{k}={c[k]}" for k in ("BN", "BM", "BK", "SPLIT") if k in c)
                    label = (f"{fn.__name__:22s} {dt:4s} hard={int(bool(hard))} {tiles} "
                             f"warps={cfg.num_warps} stages={cfg.num_stages}")
                    failures += _compile(fn, sig, c, cfg, label, target, arch, ("d", "sxn", "syn"))
    return failures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="90", help="compute capability, e.g. 90 (H100), 80 (A100)")
    ap.add_argument("--ops", default="roi,loss", help="comma-separated: roi, loss")
    args = ap.parse_args(argv)
    target = GPUTarget("cuda", int(args.arch), 32)
    ops = set(args.ops.split(","))
    failures = loss_variants(target, args.arch) if "loss" in ops else 0
    roi_dtypes = (("fp32", tl.float32), ("bf16", tl.float32), ("fp16", tl.float32), ("fp64", tl.float64))
    for fdt, acc in (roi_dtypes if "roi" in ops else ()):
        adt = "*fp64" if fdt == "fp64" else "*fp32"
        for cl in (True, False):
            align = dict(PH=7, PW=7, CL=cl, VEC=cl, ACC=acc, BLOCK_PH=8, BLOCK_PW=8, BLOCK_J=16)
            fuse = dict(S=7, CL=cl, VEC=cl, ACC=acc, BLOCK_S=8, BLOCK_J=16)
            jobs = [
                (R._roi_align_fwd_kernel, {"feat_ptr": f"*{fdt}", "rois_ptr": "*fp32", "out_ptr": f"*{fdt}"},
                 align, R._align_fwd_configs()),
                (R._roi_align_bwd_kernel, {"grad_ptr": f"*{fdt}", "rois_ptr": "*fp32", "gfeat_ptr": adt},
                 align, R._align_bwd_configs()),
                (R._roi_pool_fuse_fwd_kernel,
                 {"feat_ptr": f"*{fdt}", "rois_ptr": "*fp32", "glob_ptr": f"*{fdt}", "wgt_ptr": f"*{fdt}",
                  "bias_ptr": f"*{fdt}", "z_ptr": f"*{fdt}", "r_ptr": adt, "a_ptr": adt},
                 fuse, R._fuse_fwd_configs()),
                (R._roi_pool_fuse_bwd_kernel,
                 {"gz_ptr": f"*{fdt}", "rois_ptr": "*fp32", "glob_ptr": f"*{fdt}", "wgt_ptr": f"*{fdt}",
                  "r_ptr": adt, "a_ptr": adt, "gfeat_ptr": adt, "gglob_ptr": adt, "gw_ptr": adt, "gb_ptr": adt},
                 fuse, R._fuse_bwd_configs()),
            ]
            for autotuner, ptrs, consts, configs in jobs:
                fn = autotuner.fn
                for cfg in configs:
                    c = {**consts, **cfg.kwargs}
                    sig = {**ptrs, **SCALARS, **{k: "constexpr" for k in c}}
                    label = (f"{fn.__name__:26s} {fdt:4s} {'nhwc' if cl else 'nchw'} "
                             f"BLOCK_C={c['BLOCK_C']:<3d} warps={cfg.num_warps}")
                    failures += _compile(fn, sig, c, cfg, label, target, args.arch)
    print("all variants compiled" if not failures else f"{failures} variants failed to compile")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
