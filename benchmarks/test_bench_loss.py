"""pytest-benchmark micro benchmarks of the chunked CLIP loss (small sizes, CPU).

    pytest benchmarks/test_bench_loss.py --benchmark-only [--benchmark-compare]

The issue-level comparison (B up to 16384 / 65536, floor, memory) is bench_loss.py; these are
quick regression guards of forward + backward at B = 512, D = 256 for open_clip and our
backends, grouped so that pytest-benchmark prints them side by side.
"""
from __future__ import annotations

import math

import pytest
import torch

from regionmed_fast.ops import chunked_clip_loss
from regionmed_fast.ops.loss_reference import clip_loss_reference

B, D = 512, 256


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=1)
    y = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=1)
    return x, y


def _open_clip():
    open_clip = pytest.importorskip("open_clip")
    loss = open_clip.loss.ClipLoss()
    return lambda x, y, s: loss(x, y, s)


IMPLS = {
    "open_clip": _open_clip,
    "reference": lambda: (lambda x, y, s: clip_loss_reference(x, y, s)),
    "ours-auto": lambda: (lambda x, y, s: chunked_clip_loss(x, y, s)),
    "ours-cpu-tiled": lambda: (lambda x, y, s: chunked_clip_loss(x, y, s, backend="cpu", chunk_size=(128, 256))),
    "ours-hard-negatives": lambda: (lambda x, y, s: chunked_clip_loss(x, y, s, hard_negative_beta=0.5)),
    "ours-sigmoid": lambda: (lambda x, y, s: chunked_clip_loss(x, y, s, -10.0, kind="sigmoid")),
}


@pytest.mark.benchmark(group=f"clip loss fwd+bwd B={B} D={D} fp32 cpu")
@pytest.mark.parametrize("name", list(IMPLS))
def test_loss_fwd_bwd(benchmark, inputs, name):
    fn = IMPLS[name]()
    x0, y0 = inputs
    x, y = x0.clone().requires_grad_(True), y0.clone().requires_grad_(True)
    p = torch.tensor(math.log(1 / 0.07), requires_grad=True)

    def run():
        return torch.autograd.grad(fn(x, y, p.exp()), (x, y, p))

    grads = benchmark(run)
    assert all(torch.isfinite(g).all() for g in grads)
