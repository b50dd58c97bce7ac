"""The ``cpu`` backend of the chunked CLIP loss: tiled PyTorch, one GEMM per logits tile.

Why tiles: a ``256 x 1024`` fp32 tile (1 MiB) stays in a core's L2, so the max / exp / sum
passes that follow its GEMM run from cache, and tile GEMMs beat one GEMM writing the full
``N x M`` matrix, which is memory-bound (measurements: docs/loss.md, Design notes).

Why threads over tiles, not inside ops: each tile op is small, and with PyTorch's intra-op
threading every one of them ends in an OpenMP barrier, which on a busy machine waits for a
descheduled thread. So the row blocks are shared out to ``torch.get_num_threads()`` worker
threads that each run single-threaded ops on their own tiles (GEMMs and exps release the GIL);
column statistics / text gradients are accumulated per worker and merged at the end.

Every function takes the *local* rows ``x [n, D]`` (unscaled) and the columns ``y [M, D]`` it is
compared with, and works in float32 (float64 for float64 inputs). ``t_ij = scale * <x_i, y_j>``
(no bias: the softmax loss does not depend on it; the sigmoid functions take it separately).
"""
from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

#: Default (rows, cols) of a logits tile: one tile in L2 is enough (docs/loss.md, Design notes).
DEFAULT_TILE = (256, 1024)

_pool: ThreadPoolExecutor | None = None
_pool_pid = 0
_workers = threading.local()


@contextlib.contextmanager
def threads_as_workers():
    """Run the enclosed PyTorch ops single-threaded; the tile loops use the thread count.

    The loss's O((N + M) D) ops are small: under intra-op threading each ends in an OpenMP
    barrier, which on a busy machine costs a scheduler slice (docs/loss.md, Design notes).
    """
    prev = torch.get_num_threads()
    _workers.n = prev
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev)
        _workers.n = None
_pool_lock = threading.Lock()


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _executor(workers: int) -> ThreadPoolExecutor:
    global _pool, _pool_pid
    with _pool_lock:
        # a forked child (e.g. a DataLoader worker) inherits the pool object but not its threads
        if _pool is None or _pool._max_workers != workers or _pool_pid != os.getpid():
            if _pool is not None and _pool_pid == os.getpid():
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(workers, thread_name_prefix="regionmed-loss")
            _pool_pid = os.getpid()
        return _pool


def _over_row_blocks(n: int, rows: int, work: Callable[[int, int, dict], None],
                     first: dict | None = None) -> list[dict]:
    """Run ``work(r0, r1, state)`` for every block of ``rows`` rows; one ``state`` per worker.

    The first worker starts from ``first`` (the caller's output accumulators: one copy fewer).
    """
    blocks = list(range(0, n, rows))
    workers = min(getattr(_workers, "n", None) or torch.get_num_threads(), len(blocks))
    if workers <= 1 or not blocks:
        state: dict = first if first is not None else {}
        for r0 in blocks:
            work(r0, min(r0 + rows, n), state)
        return [state]

    def loop(w: int) -> dict:
        torch.set_num_threads(1)  # this worker's ops run single-threaded
        state: dict = first if (w == 0 and first is not None) else {}
        # grad mode is per thread: the caller's no_grad (autograd.Function.forward) does not
        # reach the workers. Static round-robin: the sums, hence the result, do not vary.
        with torch.no_grad():
            for r0 in blocks[w::workers]:
                work(r0, min(r0 + rows, n), state)
        return state

    prev = torch.get_num_threads()
    torch.set_num_threads(1)  # MKL's thread count is global: keep GEMMs single-threaded too
    try:
        futures = [_executor(workers).submit(loop, w) for w in range(workers)]
        return [f.result() for f in futures]
    finally:
        torch.set_num_threads(prev)


def _acc(state: dict, key: str, make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``state[key]``, created by ``make`` on first use (not ``setdefault``: that allocates every time)."""
    if key not in state:
        state[key] = make()
    return state[key]


def _buffers(state: dict, tile: tuple[int, int], cd: torch.dtype, device, count: int) -> list[torch.Tensor]:
    if "bufs" not in state:
        state["bufs"] = [torch.empty(tile[0] * tile[1], dtype=cd, device=device) for _ in range(count)]
    return state["bufs"]


def _tile_logits(xc, yc, sc: float, r0, r1, c0, c1, buf) -> torch.Tensor:
    """``sc * x[r0:r1] @ y[c0:c1].T`` into ``buf``; the GEMM applies the scale (alpha) for free."""
    t = buf[: (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0)
    return t.addmm_(xc[r0:r1], yc[c0:c1].T, beta=0, alpha=sc)


def tile_lse(t: torch.Tensor, buf: torch.Tensor, dim: int, keep: torch.Tensor | None = None) -> torch.Tensor:
    """float64 log-sum-exp of a tile along ``dim`` (over ``keep`` only when given), ``buf`` as scratch.

    The sum of ``exp(t - max)`` is fp32, the result ``max + log(sum)`` float64: rounded to fp32
    it would carry an error of ``eps * |max|`` (1e-4 at logits ~2000), which ``exp(t - lse)``
    in the backward turns into the same relative error of every gradient.
    """
    if keep is not None:
        t = t.masked_fill(~keep, float("-inf"))
    mx = t.amax(dim, keepdim=True)
    if keep is not None:  # a row without kept entries: its sum is 0, its LSE -inf
        mx = mx.nan_to_num(neginf=0.0)
    e = buf[: t.numel()].view_as(t)
    torch.sub(t, mx, out=e).exp_()
    return e.sum(dim, dtype=torch.float64).log_().add_(mx.squeeze(dim))


def split_shift(shift: torch.Tensor, cd: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(hi, lo)`` in ``cd`` with ``hi + lo == shift`` to ~2x the precision of ``cd``.

    ``exp((t - hi) - lo)`` keeps the precision of a float64 shift: ``t - hi`` is exact where it
    matters (near the row's maximum) and ``lo`` is tiny. ``lo`` is None when ``shift`` has no
    more precision than ``cd``; infinite shifts (a row that takes no part) get ``lo = 0``.
    """
    hi = shift.to(cd)
    if shift.dtype.itemsize <= torch.empty((), dtype=cd).element_size():
        return hi, None
    lo = (shift - hi.to(shift.dtype)).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0).to(cd)
    return hi, lo


def shift_slices(shift: tuple[torch.Tensor, torch.Tensor | None], idx) -> list:
    """Per statistic, ``(hi[i][idx], lo[i][idx])`` of a :func:`split_shift` pair of ``[k, n]``."""
    hi, lo = shift
    return [(hi[i][idx], None if lo is None else lo[i][idx]) for i in range(hi.shape[0])]


def exp_shifted(v: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    torch.sub(v, hi, out=out)
    if lo is not None:
        out.sub_(lo)
    return out.exp_()


def _prepare(x, y, scale, tile):
    # no scaled copy of x: the scale rides on the GEMMs' alpha (one [N, D] buffer less)
    cd = compute_dtype(x.dtype)
    xc, yc = x.to(cd), y.to(cd)
    n, m = xc.shape[0], yc.shape[0]
    return cd, xc, yc, float(scale), n, m, (min(tile[0], n), min(tile[1], m))


def softmax_stats(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, gi: torch.Tensor | None,
                  gt: torch.Tensor | None, beta: float, tile: tuple[int, int]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Row statistics over all ``M`` columns and column statistics over these ``n`` rows.

    ``beta == 0``: ``[1, n]`` and ``[1, M]`` log-sum-exps of ``t``. ``beta > 0`` (HN-NCE):
    ``[3, .]`` = LSE over positives of ``t``, over negatives of ``(1+beta) t`` and of ``beta t``
    (``gi [n]``, ``gt [M]`` are group ids; equal ids are positives). float64 (see :func:`tile_lse`).
    """
    cd, xc, yc, sc, n, m, tile = _prepare(x, y, scale, tile)
    k = 1 if beta == 0.0 else 3
    f64 = torch.float64
    rows = torch.full((k, n), float("-inf"), dtype=f64, device=xc.device)

    def work(r0: int, r1: int, st: dict) -> None:
        tbuf, ebuf = _buffers(st, tile, cd, xc.device, 2)
        cols = _acc(st, "cols", lambda: torch.full((k, m), float("-inf"), dtype=f64, device=xc.device))
        for c0 in range(0, m, tile[1]):
            c1 = min(c0 + tile[1], m)
            t = _tile_logits(xc, yc, sc, r0, r1, c0, c1, tbuf)
            if k == 1:
                torch.logaddexp(rows[0, r0:r1], tile_lse(t, ebuf, 1), out=rows[0, r0:r1])
                torch.logaddexp(cols[0, c0:c1], tile_lse(t, ebuf, 0), out=cols[0, c0:c1])
                continue
            pos = gi[r0:r1, None] == gt[None, c0:c1]
            neg = ~pos
            for i, (v, keep) in enumerate(((t, pos), (t * (1.0 + beta), neg), (t * beta, neg))):
                torch.logaddexp(rows[i, r0:r1], tile_lse(v, ebuf, 1, keep), out=rows[i, r0:r1])
                torch.logaddexp(cols[i, c0:c1], tile_lse(v, ebuf, 0, keep), out=cols[i, c0:c1])

    cols = torch.full((k, m), float("-inf"), dtype=f64, device=xc.device)
    for st in _over_row_blocks(n, tile[0], work, first={"cols": cols})[1:]:
        if "cols" in st:
            torch.logaddexp(cols, st["cols"], out=cols)
    return rows, cols


def tile_softmax_grad(t: torch.Tensor, rsh, csh, pos: torch.Tensor | None, beta: float,
                      g: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """``G`` of one logits tile into ``g`` (``e``: scratch of the same shape; ``t`` unchanged).

    ``rsh`` / ``csh``: per statistic ``(hi, lo)`` shifts broadcastable to the tile (rows
    ``[r, 1]``, columns ``[1, c]``; see :func:`split_shift`); ``pos``: the positives mask
    (HN-NCE only). The formula is :func:`softmax_grads`'.
    """
    if beta == 0.0:
        exp_shifted(t, *rsh[0], g)
        return g.add_(exp_shifted(t, *csh[0], e))
    g.zero_()
    tb, tc = t * (1.0 + beta), t * beta
    for sh in (rsh, csh):
        on_pos = exp_shifted(t, *sh[0], torch.empty_like(t))
        on_neg = exp_shifted(tb, *sh[1], torch.empty_like(t)).mul_(1.0 + beta)
        on_neg.sub_(exp_shifted(tc, *sh[2], e).mul_(beta))
        g.add_(torch.where(pos, on_pos, on_neg))
    return g


def softmax_grads(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, gi: torch.Tensor | None,
                  gt: torch.Tensor | None, beta: float, row_shift: torch.Tensor,
                  col_shift: torch.Tensor, tile: tuple[int, int]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(G @ y, G.T @ (scale x))`` for ``G = dL/dt`` rebuilt tile by tile from the shifts.

    ``beta == 0``: ``G_ij = exp(t_ij - row_shift[0, i]) + exp(t_ij - col_shift[0, j])``.
    ``beta > 0``: on positives ``exp(t - s0)``, on negatives
    ``(1+beta) exp((1+beta) t - s1) - beta exp(beta t - s2)``, per row plus per column.
    float64 shifts keep their precision (:func:`split_shift`); ``+inf`` drops a row / column.
    """
    cd, xc, yc, sc, n, m, tile = _prepare(x, y, scale, tile)
    d = yc.shape[1]
    gx = torch.zeros(n, d, dtype=cd, device=xc.device)
    rs, cs = split_shift(row_shift, cd), split_shift(col_shift, cd)

    def work(r0: int, r1: int, st: dict) -> None:
        tbuf, gbuf, ebuf = _buffers(st, tile, cd, xc.device, 3)
        gy = _acc(st, "gy", lambda: torch.zeros(m, d, dtype=cd, device=xc.device))
        rsh = shift_slices(rs, (slice(r0, r1), None))
        for c0 in range(0, m, tile[1]):
            c1 = min(c0 + tile[1], m)
            t = _tile_logits(xc, yc, sc, r0, r1, c0, c1, tbuf)
            csh = shift_slices(cs, (None, slice(c0, c1)))
            pos = None if beta == 0.0 else gi[r0:r1, None] == gt[None, c0:c1]
            g = tile_softmax_grad(t, rsh, csh, pos, beta, gbuf[: t.numel()].view_as(t), ebuf[: t.numel()].view_as(t))
            gx[r0:r1].addmm_(g, yc[c0:c1])
            gy[c0:c1].addmm_(g.T, xc[r0:r1], alpha=sc)

    gy = torch.zeros(m, d, dtype=cd, device=xc.device)
    for st in _over_row_blocks(n, tile[0], work, first={"gy": gy})[1:]:
        if "gy" in st:
            gy += st["gy"]
    return gx, gy


def sigmoid_sum(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                tile: tuple[int, int]) -> torch.Tensor:
    """``sum_ij softplus(t_ij + bias)`` over these rows and all columns (0-d)."""
    cd, xc, yc, sc, n, m, tile = _prepare(x, y, scale, tile)
    b = bias.to(cd)

    def work(r0: int, r1: int, st: dict) -> None:
        (tbuf,) = _buffers(st, tile, cd, xc.device, 1)
        total = _acc(st, "total", lambda: torch.zeros((), dtype=torch.float64, device=xc.device))
        for c0 in range(0, m, tile[1]):
            t = _tile_logits(xc, yc, sc, r0, r1, c0, min(c0 + tile[1], m), tbuf)
            total += F.softplus(t.add_(b)).sum(dtype=torch.float64)

    return sum(st["total"] for st in _over_row_blocks(n, tile[0], work) if "total" in st)


def sigmoid_grads(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                  coef: float, tile: tuple[int, int]
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(G @ y, G.T @ (scale x), sum G)`` for ``G = coef * sigmoid(t + bias)``."""
    cd, xc, yc, sc, n, m, tile = _prepare(x, y, scale, tile)
    b = bias.to(cd)
    d = yc.shape[1]
    gx = torch.zeros(n, d, dtype=cd, device=xc.device)

    def work(r0: int, r1: int, st: dict) -> None:
        (tbuf,) = _buffers(st, tile, cd, xc.device, 1)
        gy = _acc(st, "gy", lambda: torch.zeros(m, d, dtype=cd, device=xc.device))
        gsum = _acc(st, "gsum", lambda: torch.zeros((), dtype=torch.float64, device=xc.device))
        for c0 in range(0, m, tile[1]):
            c1 = min(c0 + tile[1], m)
            g = _tile_logits(xc, yc, sc, r0, r1, c0, c1, tbuf).add_(b).sigmoid_().mul_(coef)
            gsum += g.sum(dtype=torch.float64)
            gx[r0:r1].addmm_(g, yc[c0:c1])
            gy[c0:c1].addmm_(g.T, xc[r0:r1], alpha=sc)

    gy = torch.zeros(m, d, dtype=cd, device=xc.device)
    gsum = torch.zeros((), dtype=torch.float64, device=xc.device)
    for st in _over_row_blocks(n, tile[0], work, first={"gy": gy, "gsum": gsum})[1:]:
        if "gy" in st:
            gy += st["gy"]
            gsum += st["gsum"]
    return gx, gy, gsum
