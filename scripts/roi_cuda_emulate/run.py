"""Runs the ROI CUDA kernels (csrc/roi/roi_cuda.cu + roi_cuda_kernels.cuh) on the CPU, in emulation,
and compares them with torchvision: a correctness check for machines without a GPU.

The real host wrappers and kernels are compiled as C++ with emu_shim.h, which runs each CUDA
thread as a std::thread (barriers for __syncthreads and warp shuffles, std::atomic_ref for
atomicAdd). Only the launch syntax and CUDA-runtime calls (stream, device guard, launch check)
are rewritten. It checks indexing, thread mappings, reductions, dtype handling and the result for
invalid rois (NaN rows, no gradient); it cannot check timing, memory-model or occupancy issues. About 1.5 min to build on 2 cores, seconds to run.

    python scripts/roi_cuda_emulate/run.py [--build-dir /tmp/regionmed_roi_cuda_emu] [--cases N]
"""
from __future__ import annotations

import argparse
import os
import random
import re
import sys

import torch
import torchvision
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


def generate(out_path: str) -> None:
    src = open(os.path.join(REPO, "csrc", "roi", "roi_cuda.cu")).read()
    for inc in ("ATen/cuda/CUDAContext.h", "c10/cuda/CUDAException.h", "c10/cuda/CUDAGuard.h"):
        src = src.replace(f"#include <{inc}>\n", "")
    src = src.replace("#include <torch/library.h>", '#include <torch/extension.h>\n#include "emu_shim.h"')
    src = src.replace('#include "roi_cuda_kernels.cuh"', '#include "roi/roi_cuda_kernels.cuh"')
    src = re.sub(r"c10::cuda::CUDAGuard guard\([^;]*\);", "", src)
    src = src.replace("cudaStream_t stream = at::cuda::getCurrentCUDAStream();", "int stream = 0; (void)stream;")
    src = src.replace("C10_CUDA_KERNEL_LAUNCH_CHECK();", "")
    src = src.replace("t.is_cuda()", "t.is_cpu()").replace("bias_in.is_cuda()", "bias_in.is_cpu()")
    count = [0]

    def launch(m: re.Match) -> str:
        count[0] += 1
        grid, threads, smem, _stream = [x.strip() for x in m.group(2).split(",")]
        return f"emu_launch(dim3({grid}), {threads}, {smem}, [&] {{ {m.group(1)}({m.group(3)}); }});"

    launches = src.count("<<<")
    src = re.sub(r"(\w+<scalar_t, acc_t>)<<<(.*?)>>>\((.*?)\);", launch, src, flags=re.S)
    if count[0] != launches or "<<<" in src:
        sys.exit(f"rewrote {count[0]} of the {launches} kernel launches in roi_cuda.cu")
    src = src[:src.index("TORCH_LIBRARY_IMPL")] + """PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("roi_align_forward", &regionmed::roi_cuda::roi_align_forward);
  m.def("roi_align_backward", &regionmed::roi_cuda::roi_align_backward);
  m.def("roi_pool_fuse_forward", &regionmed::roi_cuda::roi_pool_fuse_forward);
  m.def("roi_pool_fuse_backward", &regionmed::roi_cuda::roi_pool_fuse_backward);
}
"""
    if not os.path.exists(out_path) or open(out_path).read() != src:  # keep ninja's cache
        with open(out_path, "w") as f:
            f.write(src)


def build(build_dir: str):
    os.makedirs(build_dir, exist_ok=True)
    path = os.path.join(build_dir, "emu_roi.cpp")
    generate(path)
    return cpp_extension.load(name="regionmed_roi_cuda_emu", sources=[path],
                              extra_include_paths=[os.path.join(REPO, "csrc"), HERE],
                              extra_cflags=["-O1", "-std=c++20", "-pthread"], extra_ldflags=["-pthread"],
                              build_directory=build_dir)


def fuse_reference(x, rois, g, w, bias, S, scale, sr, aligned):
    r = torchvision.ops.roi_align(x, rois, (S, S), scale, sr, aligned).mean(dim=(2, 3))
    gk = g[rois[:, 0].long()]
    a = torch.sigmoid(r @ w[0] + gk @ w[1] + bias)
    return a[:, None] * r + (1 - a[:, None]) * gk, r, a


def random_rois(rng: random.Random, B: int, H: int, W: int, K: int, scale: float,
                reversed_ok: bool = True) -> torch.Tensor:
    rows = []
    # zero-area, sub-pixel, partly and wholly outside, and reversed boxes (torchvision's CPU kernel
    # cannot take reversed ones with aligned=True and adaptive sampling: reversed_ok=False there)
    back = [-rng.uniform(0.2, 3)] if reversed_ok else []
    for _ in range(K):
        x1, y1 = rng.uniform(-2, W + 1) / scale, rng.uniform(-2, H + 1) / scale
        dw = rng.choice([0.0, 0.3, rng.uniform(0, W + 2), *back]) / scale
        dh = rng.choice([0.0, 0.5, rng.uniform(0, H + 2), *back]) / scale
        rows.append([rng.randrange(B), x1, y1, x1 + dw, y1 + dh])
    return torch.tensor(rows, dtype=torch.float64).reshape(-1, 5)


def make_invalid(rois: torch.Tensor, B: int, rng: random.Random, n: int) -> torch.Tensor:
    """Marks ``n`` rois invalid (NaN / infinite coordinate, batch index out of range or not an
    integer): the kernels must give them NaN outputs and take no gradient from them."""
    rois = rois.clone()
    for k in rng.sample(range(rois.shape[0]), min(n, rois.shape[0])):
        kind = rng.randrange(4)
        if kind == 0:
            rois[k, rng.randrange(1, 5)] = float("nan")
        elif kind == 1:
            rois[k, rng.randrange(1, 5)] = float("inf")
        elif kind == 2:
            rois[k, 0] = rng.choice([-1.0, float(B)])
        else:
            rois[k, 0] = 0.5
    return rois


def check_case(ext, rng, B, C, H, W, K, S, sr, aligned, scale, cl, dtype, invalid=0, param_dtype=None) -> bool:
    x = torch.randn(B, C, H, W, dtype=torch.float64)
    rois = make_invalid(random_rois(rng, B, H, W, K, scale, reversed_ok=sr > 0 or not aligned), B, rng, invalid)
    bad_roi = ~(torch.isfinite(rois).all(1) & (rois[:, 0] >= 0) & (rois[:, 0] < B) & (rois[:, 0] == rois[:, 0].floor()))
    ref_rois = torch.where(bad_roi[:, None], torch.tensor([0.0, 0, 0, 1, 1], dtype=rois.dtype), rois)
    g = torch.randn(B, C, dtype=torch.float64)
    w = 0.5 * torch.randn(2, C, dtype=torch.float64)
    bias = torch.randn(1, dtype=torch.float64)
    leaves = [t.clone().requires_grad_(True) for t in (x, g, w, bias)]
    ref_al = torchvision.ops.roi_align(leaves[0], ref_rois, (S, S), scale, sr, aligned)
    go = torch.randn_like(ref_al)
    ref_al.backward(go.masked_fill(bad_roi[:, None, None, None], 0))  # invalid rois: no gradient
    ref_gx = leaves[0].grad.clone()
    leaves[0].grad = None
    z, r, a = fuse_reference(leaves[0], ref_rois, leaves[1], leaves[2], leaves[3], S, scale, sr, aligned)
    gz = torch.randn_like(z)
    z.backward(gz.masked_fill(bad_roi[:, None], 0))
    nan = float("nan")
    ref_al, z, r, a = (ref_al.detach().masked_fill(bad_roi[:, None, None, None], nan),
                       z.detach().masked_fill(bad_roi[:, None], nan), r.detach().masked_fill(bad_roi[:, None], nan),
                       a.detach().masked_fill(bad_roi, nan))
    feat = (x.permute(0, 2, 3, 1) if cl else x).contiguous().to(dtype)
    kr = rois.to(torch.float64 if dtype == torch.float64 else torch.float32)
    to_nchw = (lambda t: t.permute(0, 3, 1, 2)) if cl else (lambda t: t)
    out = ext.roi_align_forward(feat, kr, scale, S, S, sr, aligned, cl)
    gx = to_nchw(ext.roi_align_backward(go.to(dtype), kr, scale, S, S, B, C, H, W, sr, aligned, cl))
    pd = param_dtype or dtype  # global_feat / gate dtype (the kernels read the features' or float)
    z2, r2, a2 = ext.roi_pool_fuse_forward(feat, kr, g.to(pd), w.to(pd), bias.to(pd), scale, S, sr, aligned, cl)
    grads = ext.roi_pool_fuse_backward(gz.to(dtype), kr, g.to(pd), w.to(pd), r2, a2, scale, S, sr, aligned,
                                       cl, B, H, W)
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 6e-2}[dtype]
    pairs = [("align", out, ref_al), ("align_grad", gx, ref_gx), ("z", z2, z), ("r", r2, r), ("a", a2, a),
             ("grad_features", to_nchw(grads[0]), leaves[0].grad), ("grad_global", grads[1], leaves[1].grad),
             ("grad_gate_weight", grads[2], leaves[2].grad), ("grad_gate_bias", grads[3], leaves[3].grad)]
    bad = []
    for name, got, exp in pairs:
        got, exp = got.double(), exp.detach()
        if got.shape != exp.shape:
            bad.append(f"{name} shape {tuple(got.shape)} != {tuple(exp.shape)}")
            continue
        if not torch.equal(torch.isnan(got), torch.isnan(exp)):
            bad.append(f"{name} NaN pattern differs")
            continue
        got, exp = got.nan_to_num(0.0), exp.nan_to_num(0.0)
        if got.numel() and (got - exp).abs().max().item() > tol * max(1.0, exp.abs().max().item()):
            bad.append(f"{name} max err {(got - exp).abs().max().item():.2e}")
    label = (f"B={B} C={C} {H}x{W} K={K} S={S} sr={sr} aligned={aligned} scale={scale:g} nhwc={cl} {dtype}"
             + (f" invalid={int(bad_roi.sum())}" if invalid else ""))
    print(("ok   " if not bad else "FAIL ") + label + ("" if not bad else ": " + "; ".join(bad)), flush=True)
    return not bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build-dir", default="/tmp/regionmed_roi_cuda_emu")
    ap.add_argument("--cases", type=int, default=40, help="random small cases after the fixed ones")
    args = ap.parse_args(argv)
    ext = build(args.build_dir)
    torch.manual_seed(0)
    rng = random.Random(0)
    ok = True
    fixed = [(2, 70, 9, 11, 7, 3, -1, True, 1.0, True, torch.float32),
             (3, 40, 13, 10, 9, 2, 0, False, 0.5, False, torch.float32),
             (2, 300, 6, 7, 3, 2, 2, True, 1.0, True, torch.float32),  # > one backward channel chunk
             (2, 5, 6, 6, 0, 2, 2, False, 1.0, False, torch.float32),  # K = 0
             (2, 6, 8, 8, 5, 2, -1, True, 0.7, True, torch.float64),
             (2, 6, 8, 8, 5, 3, 2, False, 1 / 3, False, torch.float64),
             (2, 4, 6, 6, 4, 2, 2, True, 1.0, True, torch.bfloat16),
             (2, 4, 6, 6, 4, 2, -1, False, 1.0, False, torch.float16),
             (3, 70, 9, 11, 8, 3, -1, True, 1.0, True, torch.float32, 4),  # invalid rois: NaN, no gradient
             (3, 40, 9, 11, 8, 2, 2, False, 0.5, False, torch.float32, 4),
             (2, 6, 8, 8, 6, 2, -1, True, 1.0, True, torch.bfloat16, 3),
             (2, 6, 8, 8, 5, 2, 2, False, 1.0, False, torch.bfloat16, 0, torch.float32),  # float gate, bf16 map
             (2, 6, 8, 8, 5, 2, 2, True, 1.0, True, torch.float16, 0, torch.float64)]
    for case in fixed:
        ok &= check_case(ext, rng, *case)
    for _ in range(args.cases):
        B, H, W = rng.randint(1, 3), rng.randint(1, 7), rng.randint(1, 7)
        case = (B, rng.choice([1, 2, 3, 33]), H, W, rng.randint(0, 5), rng.randint(1, 3),
                rng.choice([-1, 0, 1, 2]), rng.random() < 0.5, rng.choice([1.0, 0.5]), rng.random() < 0.5,
                torch.float32)
        ok &= check_case(ext, rng, *case, invalid=rng.choice([0, 0, 1, 2]))
    print("CUDA kernels (emulated) match torchvision" if ok else "MISMATCHES (see FAIL lines)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
