"""Compiles the ROI Triton kernels (kernels/roi.py) for a GPU target without a GPU.

The interpreter (TRITON_INTERPRET=1) checks what the kernels compute but not whether they
compile: this script lowers every kernel through Triton's real pipeline (TTIR -> TTGIR -> LLVM ->
PTX -> cubin with Triton's bundled ptxas) for sm_90, in each dtype / layout / tuning config, and
prints registers, spills and shared memory. About 1 s per variant.

    python scripts/check_triton_compile.py [--arch 90]
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="90", help="compute capability, e.g. 90 (H100), 80 (A100)")
    args = ap.parse_args(argv)
    target = GPUTarget("cuda", int(args.arch), 32)
    failures = 0
    for fdt, acc in (("fp32", tl.float32), ("bf16", tl.float32), ("fp16", tl.float32), ("fp64", tl.float64)):
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
                    try:
                        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=c), target=target,
                                           options={"num_warps": cfg.num_warps})
                        print(f"ok   {label} {ptxas_stats(k.asm['ptx'], args.arch)} smem={k.metadata.shared}",
                              flush=True)
                    except Exception as exc:  # report every failing variant, then fail
                        failures += 1
                        print(f"FAIL {label}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}", flush=True)
    print("all variants compiled" if not failures else f"{failures} variants failed to compile")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
