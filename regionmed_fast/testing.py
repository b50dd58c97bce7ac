"""Shared op-test helper: compare a backend with the reference and report the worst mismatches.

Every op test uses :func:`assert_close` (one tensor) or :func:`check_op` (forward and backward of
a whole op). Tolerances are per dtype (:data:`TOLERANCES`); a failure message lists the worst
elements with their index, actual, expected and error, so a wrong index shows at a glance.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = ["Tol", "TOLERANCES", "tol_for", "mismatch_report", "assert_close", "check_op",
           "rel_error"]


@dataclass(frozen=True)
class Tol:
    """Absolute and relative tolerance: pass when ``|a - e| <= atol + rtol * |e|``."""

    atol: float
    rtol: float


#: Default tolerances by the dtype of the tensors under test (outputs of fp32-accumulating
#: kernels in low precision are compared after upcasting).
TOLERANCES: dict[torch.dtype, Tol] = {
    torch.float64: Tol(1e-9, 1e-7),
    torch.float32: Tol(1e-5, 1e-4),
    torch.bfloat16: Tol(2e-2, 2e-2),
    torch.float16: Tol(2e-3, 2e-3),
}


def tol_for(dtype: torch.dtype, atol: float | None = None, rtol: float | None = None) -> Tol:
    """The default :class:`Tol` for ``dtype``, with optional overrides."""
    base = TOLERANCES.get(dtype, TOLERANCES[torch.float32])
    return Tol(base.atol if atol is None else atol, base.rtol if rtol is None else rtol)


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in float64 (flash-attention style bound)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    denom = e.norm().item()
    return (a - e).norm().item() / (denom if denom > 0 else 1.0)


def mismatch_report(actual: torch.Tensor, expected: torch.Tensor, tol: Tol, name: str = "tensor",
                    worst: int = 8) -> str:
    """Describe how ``actual`` differs from ``expected``; empty string when within ``tol``."""
    if actual.shape != expected.shape:
        return f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    if not torch.equal(nan_a, nan_e):
        idx = (nan_a != nan_e).nonzero()[:worst].tolist()
        return f"{name}: NaN pattern differs at {idx}"
    a = torch.where(nan_a, torch.zeros_like(a), a)
    e = torch.where(nan_e, torch.zeros_like(e), e)
    err = (a - e).abs()
    allowed = tol.atol + tol.rtol * e.abs()
    bad = err > allowed
    if a.numel() == 0 or not bool(bad.any()):
        return ""
    excess = torch.where(bad, err - allowed, torch.zeros_like(err)).flatten()
    order = excess.argsort(descending=True)[:worst]
    lines = [f"{name}: {int(bad.sum())} of {a.numel()} elements outside atol={tol.atol:g} "
             f"rtol={tol.rtol:g} (max abs err {err.max().item():.3e}, "
             f"rel norm err {rel_error(a, e):.3e}); worst:"]
    for flat in order.tolist():
        if excess[flat] <= 0:
            break
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), a.shape))
        lines.append(f"  at {index}: actual {a.flatten()[flat].item():+.6e} "
                     f"expected {e.flatten()[flat].item():+.6e} err {err.flatten()[flat].item():.3e}")
    return "\n".join(lines)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, dtype: torch.dtype | None = None,
                 atol: float | None = None, rtol: float | None = None, name: str = "tensor") -> None:
    """Raise ``AssertionError`` with a worst-mismatch report when the tensors differ.

    ``dtype`` selects the default tolerance (defaults to ``expected.dtype``).
    """
    tol = tol_for(dtype or expected.dtype, atol, rtol)
    report = mismatch_report(actual, expected, tol, name)
    if report:
        raise AssertionError(report)


def _clone_inputs(inputs: Sequence, requires_grad: Sequence[bool]) -> list:
    out = []
    for x, rg in zip(inputs, requires_grad):
        if isinstance(x, torch.Tensor):
            y = x.detach().clone()
            if rg and y.is_floating_point():
                y.requires_grad_(True)
            out.append(y)
        else:
            out.append(x)
    return out


def check_op(fn: Callable, ref: Callable, inputs: Sequence, *, grad: bool = True,
             requires_grad: Sequence[bool] | None = None, dtype: torch.dtype | None = None,
             atol: float | None = None, rtol: float | None = None,
             grad_atol: float | None = None, grad_rtol: float | None = None,
             name: str = "op", seed: int = 0) -> None:
    """Check ``fn(*inputs)`` against ``ref(*inputs)``, forward and (optionally) backward.

    Both receive fresh leaf copies of ``inputs``. Outputs may be a tensor or a tuple of tensors;
    the backward pass uses the same random upstream gradient for both, and every floating input
    marked in ``requires_grad`` (default: all floating tensors) must get a matching gradient.
    """
    if requires_grad is None:
        requires_grad = [isinstance(x, torch.Tensor) and x.is_floating_point() for x in inputs]
    a_in = _clone_inputs(inputs, requires_grad if grad else [False] * len(inputs))
    e_in = _clone_inputs(inputs, requires_grad if grad else [False] * len(inputs))
    a_out, e_out = fn(*a_in), ref(*e_in)
    a_outs = a_out if isinstance(a_out, (tuple, list)) else (a_out,)
    e_outs = e_out if isinstance(e_out, (tuple, list)) else (e_out,)
    assert len(a_outs) == len(e_outs), f"{name}: {len(a_outs)} outputs != {len(e_outs)}"
    problems = []
    for i, (a, e) in enumerate(zip(a_outs, e_outs)):
        if a is None and e is None:
            continue
        tol = tol_for(dtype or e.dtype, atol, rtol)
        problems.append(mismatch_report(a, e, tol, f"{name} output[{i}]"))
    if grad:
        gen = torch.Generator().manual_seed(seed)
        pairs = [(a, e) for a, e in zip(a_outs, e_outs)
                 if isinstance(e, torch.Tensor) and e.requires_grad]
        if pairs:
            a_sum = 0.0
            e_sum = 0.0
            for a, e in pairs:
                g = torch.randn(e.shape, generator=gen, dtype=torch.float64).to(e.device)
                a_sum = a_sum + (a.double() * g).sum()
                e_sum = e_sum + (e.double() * g).sum()
            a_grads = torch.autograd.grad(a_sum, [x for x in a_in if isinstance(x, torch.Tensor)
                                                  and x.requires_grad], allow_unused=True)
            e_grads = torch.autograd.grad(e_sum, [x for x in e_in if isinstance(x, torch.Tensor)
                                                  and x.requires_grad], allow_unused=True)
            leaf_idx = [i for i, x in enumerate(e_in) if isinstance(x, torch.Tensor) and x.requires_grad]
            for i, ga, ge in zip(leaf_idx, a_grads, e_grads):
                if ge is None:
                    ge = torch.zeros_like(e_in[i])
                if ga is None:
                    ga = torch.zeros_like(a_in[i])
                tol = tol_for(dtype or ge.dtype, grad_atol if grad_atol is not None else atol,
                              grad_rtol if grad_rtol is not None else rtol)
                problems.append(mismatch_report(ga, ge, tol, f"{name} grad of input[{i}]"))
    problems = [p for p in problems if p]
    if problems:
        raise AssertionError("\n".join(problems))
