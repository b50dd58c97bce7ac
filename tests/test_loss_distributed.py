"""The distributed chunked CLIP loss in 2 gloo processes equals the single-process loss and grads.

One spawn runs every case (a process start costs several seconds of ``import torch``). Shards
are uneven on purpose. Each rank checks its loss against the full-batch loss computed by the
same process, its shard's gradients against the matching rows of the full-batch gradients,
and logit_scale / logit_bias gradients against the full-batch ones.
"""
from __future__ import annotations

import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cases():
    g = torch.Generator().manual_seed(1)
    n, m, d = 11, 9, 8
    cases = []
    x = torch.randn(10, d, generator=g, dtype=torch.float64)
    y = torch.randn(10, d, generator=g, dtype=torch.float64)
    cases.append(dict(x=x, y=y, split_x=[6, 4], split_y=[3, 7], kw={}))
    cases.append(dict(x=x, y=y, split_x=[5, 5], split_y=[5, 5], kw=dict(hard_negative_beta=0.5)))
    cases.append(dict(x=x, y=y, split_x=[4, 6], split_y=[6, 4], kw=dict(kind="sigmoid"), bias=True))
    xi = torch.randn(n, d, generator=g, dtype=torch.float64)
    yi = torch.randn(m, d, generator=g, dtype=torch.float64)
    ids = (torch.randint(0, 5, (n,), generator=g), torch.randint(0, 5, (m,), generator=g))
    cases.append(dict(x=xi, y=yi, split_x=[7, 4], split_y=[2, 7], kw={}, ids=ids))
    cases.append(dict(x=xi, y=yi, split_x=[7, 4], split_y=[2, 7], kw=dict(hard_negative_beta=0.3), ids=ids))
    cases.append(dict(x=xi, y=yi, split_x=[3, 8], split_y=[5, 4], kw=dict(kind="sigmoid"), ids=ids, bias=True))
    # a rank whose shard is empty (the region loss when its images have no boxes): it gets the
    # global loss, empty gradients for its empty inputs and the full logit_scale gradient
    cases.append(dict(x=x, y=y, split_x=[0, 10], split_y=[0, 10], kw={}))
    cases.append(dict(x=xi, y=yi, split_x=[11, 0], split_y=[0, 9], kw=dict(hard_negative_beta=0.3), ids=ids))
    cases.append(dict(x=xi, y=yi, split_x=[0, 11], split_y=[9, 0], kw=dict(kind="sigmoid"), ids=ids, bias=True))
    return cases


def _run(x, y, scale, bias, ids, kw, group=None):
    from regionmed_fast.ops import chunked_clip_loss

    x = x.clone().requires_grad_(True)
    y = y.clone().requires_grad_(True)
    s = scale.clone().requires_grad_(True)
    b = None if bias is None else bias.clone().requires_grad_(True)
    loss = chunked_clip_loss(x, y, s, b, positives=ids, chunk_size=(3, 4), group=group,
                             backend="cpu", **kw)
    loss.backward()
    return loss.detach(), x.grad, y.grad, s.grad, None if b is None else b.grad


def _worker(rank: int, port: int, errfile: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    from regionmed_fast.testing import assert_close

    try:
        for ci, c in enumerate(_cases()):
            scale = torch.tensor(2.5, dtype=torch.float64)
            bias = torch.tensor(-0.7, dtype=torch.float64) if c.get("bias") else None
            full = _run(c["x"], c["y"], scale, bias, c.get("ids"), c["kw"])
            sx, sy = c["split_x"], c["split_y"]
            ox, oy = sum(sx[:rank]), sum(sy[:rank])
            xs = c["x"][ox: ox + sx[rank]]
            ys = c["y"][oy: oy + sy[rank]]
            ids = c.get("ids")
            if ids is not None:
                ids = (ids[0][ox: ox + sx[rank]], ids[1][oy: oy + sy[rank]])
            part = _run(xs, ys, scale, bias, ids, c["kw"], group=dist.group.WORLD)
            name = f"case {ci} {c['kw']} rank {rank}"
            assert_close(part[0], full[0], name=f"{name} loss")
            assert_close(part[1], full[1][ox: ox + sx[rank]], name=f"{name} grad image")
            assert_close(part[2], full[2][oy: oy + sy[rank]], name=f"{name} grad text")
            assert_close(part[3], full[3], name=f"{name} grad logit_scale")
            if bias is not None:
                assert_close(part[4], full[4], name=f"{name} grad logit_bias")
    except BaseException as exc:
        with open(errfile, "a") as fh:
            fh.write(f"rank {rank}: {exc}\n")
        raise
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_equal_single_process():
    with tempfile.TemporaryDirectory() as tmp:
        errfile = os.path.join(tmp, "errors.txt")
        try:
            mp.spawn(_worker, args=(_free_port(), errfile), nprocs=WORLD, join=True)
        except Exception:
            msg = open(errfile).read() if os.path.exists(errfile) else "worker failed"
            pytest.fail(msg)
