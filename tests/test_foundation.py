"""The package foundation: extension loading, backend resolution, the shared test helper."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from regionmed_fast import _ext, testing
from regionmed_fast.ops import _backend


def test_extension_loads():
    mod, reason = _ext.load()
    assert mod is not None, reason
    assert mod.openmp_max_threads() >= 1


def test_info_command_lists_backends():
    out = subprocess.run([sys.executable, "-m", "regionmed_fast.info"], capture_output=True,
                         text=True, check=True).stdout
    for name in ("reference", "cpu", "triton", "cuda"):
        assert name in out


def test_resolve_auto_and_errors():
    assert _backend.resolve("x", "auto", "cpu", ("reference", "cpu", "triton")) == "cpu"
    assert _backend.resolve("x", "reference", "cpu", ("reference", "cpu")) == "reference"
    with pytest.raises(ValueError, match="backend='cuda' is not one of"):
        _backend.resolve("x", "cuda", "cpu", ("reference", "cpu"))
    with pytest.raises(RuntimeError, match="cuda backend runs on CUDA tensors"):
        _backend.resolve("x", "cuda", "cpu", ("reference", "cuda"))
    with pytest.raises(ValueError, match="unknown backend"):
        _backend.status("fast", "cpu")


def test_mismatch_report_names_worst_element():
    e = torch.zeros(4, 5)
    a = e.clone()
    a[2, 3] = 1.0
    report = testing.mismatch_report(a, e, testing.tol_for(torch.float32), "x")
    assert "1 of 20" in report and "(2, 3)" in report
    with pytest.raises(AssertionError, match=r"at \(2, 3\)"):
        testing.assert_close(a, e)
    testing.assert_close(e + 1e-7, e)


def test_check_op_catches_wrong_gradient():
    x = torch.randn(3, 4)

    def good(t):
        return t * 2

    class Bad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t * 2

        @staticmethod
        def backward(ctx, g):
            return g * 3

    testing.check_op(good, lambda t: t + t, [x])
    with pytest.raises(AssertionError, match="grad of input"):
        testing.check_op(Bad.apply, lambda t: t + t, [x])
