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


def test_info_command_prints_every_op_table_as_the_ops_resolve():
    import json

    from regionmed_fast.ops import loss as loss_mod
    from regionmed_fast.ops import roi as roi_mod

    out = subprocess.run([sys.executable, "-m", "regionmed_fast.cli", "info", "--json"],
                         capture_output=True, text=True, check=True).stdout
    ops = json.loads(out)["ops"]
    assert set(ops) == {"roi", "chunked_clip_loss"}
    for table in (roi_mod.BACKENDS, loss_mod.BACKENDS):
        shown = ops[table.op]
        assert shown["backends"].keys() == table.backends.keys()
        assert shown["aliases"] == table.aliases
        # what info says about the CPU is what the op itself decides (same process state:
        # the subprocess saw the same extension and environment)
        assert shown["status"]["cpu"] == table.report("cpu")
    # the "cpu" alias means a different provider per op, and info says which
    assert ops["roi"]["aliases"]["cpu"] == "cpp"
    assert ops["chunked_clip_loss"]["aliases"]["cpu"] == "torch-tiled"
    # the tiled loss needs no compiled extension: never reported unavailable on a CPU
    assert ops["chunked_clip_loss"]["status"]["cpu"]["torch-tiled"] == "ok"
    if _ext.has_cpu_kernels():
        assert ops["roi"]["status"]["cpu"]["cpp"] == "ok"



def test_info_text_names_every_backend_and_its_status(capsys):
    from regionmed_fast import info

    assert info.info_main([]) == 0
    text = capsys.readouterr().out
    for op, table in _backend.all_tables().items():
        assert f"\n{op}: auto on cpu: " in text
        for name in table.backends:
            status = table.report("cpu")[name]
            assert f"  {name:<12} " in text and f"on cpu: {status}" in text

def _table():
    def missing(device):
        return "kernels not built"

    return _backend.BackendTable(
        "test_op",
        [_backend.Backend("reference", "torch", ("cpu", "cuda")),
         _backend.Backend("cpp", "C++", ("cpu",)),
         _backend.Backend("fast", "C++", ("cpu",), missing),
         _backend.Backend("cuda", "CUDA", ("cuda",))],
        auto={"cpu": ("fast", "cpp", "reference"), "cuda": ("cuda", "reference")},
        aliases={"cpu": "cpp"})


def test_backend_table_resolves_auto_aliases_and_names_the_reason():
    t = _table()
    assert t.resolve("auto", "cpu") == "cpp"          # "fast" is unavailable: the next one
    assert t.resolve("cpu", "cpu") == "cpp"           # the alias
    assert t.resolve("reference", "cpu") == "reference"
    with pytest.raises(ValueError, match="backend='triton' is not one of"):
        t.resolve("triton", "cpu")
    with pytest.raises(RuntimeError, match="kernels not built"):
        t.resolve("fast", "cpu")
    with pytest.raises(RuntimeError, match="runs on cuda tensors, got cpu"):
        t.resolve("cuda", "cpu")
    assert t.report("cpu") == {"reference": "ok", "cpp": "ok", "fast": "kernels not built",
                               "cuda": "the cuda backend of test_op runs on cuda tensors, got cpu"}
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        _backend.BackendTable("bad", [_backend.Backend("reference", "torch", ("cpu",))],
                              auto={"cpu": ("nope",)})


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


# ---------------------------------------------------------------- README performance tables
def _readme_perf():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "readme_perf.py"
    spec = importlib.util.spec_from_file_location("readme_perf", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod, path.parents[1]


def test_readme_performance_tables_match_the_stored_results():
    rp, repo = _readme_perf()
    text = (repo / "README.md").read_text()
    block = text.split(rp.BEGIN, 1)[1].split(rp.END, 1)[0]
    assert block == "\n" + rp.render(str(repo / "benchmarks" / "results")), (
        "README.md's performance tables differ from benchmarks/results: run "
        "`python benchmarks/run_all.py --readme-only`")


def test_readme_perf_renders_a_run_and_judges_its_goal(tmp_path):
    import json

    rp, _ = _readme_perf()
    machine = {"tag": "cpu7-test", "platform": "Linux-x", "python": "3.11", "torch": "2.14.1", "cpus": 7,
               "threads": 7}

    def row(name, ms, mem, speed):
        return {"name": name, "group": "fwd+bwd nhwc B=2 C=8 4x4 K=3 S=2 float32", "device": "cpu",
                "median_ms": ms, "min_ms": ms, "max_ms": ms, "repeats": 3, "peak_mem_mb": mem, "meta": {},
                "ratios": {"speedup vs torchvision": speed}, "error": ""}

    payload = {"bench": "roi", "time": "2026-01-02T03:04:05+00:00", "machine": machine,
               "results": [row("torchvision", 90.0, 8.0, 1.0), row("ours-cpp", 10.0, 2.0, 9.0)]}
    (tmp_path / "cpu7-test-roi.json").write_text(json.dumps(payload))
    out = rp.render(str(tmp_path))
    assert "Machine `cpu7-test`" in out and "7 CPU cores" in out and "2026-01-02 03:04 UTC" in out
    assert "`torchvision` 90.0 ms" in out and "**9.00x**" in out and "2.0 MiB (8.0 MiB)" in out
    assert ">= 10x: **missed**" in out  # 9x misses the CPU ROI goal
    with pytest.raises(ValueError, match="README.md: needs exactly one"):
        rp.replace_block("no markers here", out)
    doc = f"intro\n{rp.BEGIN}\nold\n{rp.END}\noutro\n"
    assert rp.replace_block(doc, "new\n") == f"intro\n{rp.BEGIN}\nnew\n{rp.END}\noutro\n"


# ---------------------------------------------------------------- markers (tests/conftest.py)
class _Item:
    """The part of a pytest item that the collection hook reads and writes."""

    def __init__(self, *marks: str):
        self.marks, self.added = set(marks), []

    def get_closest_marker(self, name):
        return name if name in self.marks else None

    def add_marker(self, mark):
        self.added.append(mark)


class _Config:
    def __init__(self, markexpr: str):
        self.markexpr = markexpr

    def getoption(self, name):
        assert name == "markexpr"
        return self.markexpr


@pytest.mark.parametrize("markexpr,slow_runs", [("", False), ("not gpu", False), ("slow", True),
                                                 ("slow or gpu", True), ("slowish", False)])
def test_slow_tests_are_skipped_unless_m_names_slow(markexpr, slow_runs):
    import conftest  # tests/conftest.py (pytest puts tests/ on sys.path)
    slow, quick = _Item("slow"), _Item()
    conftest.pytest_collection_modifyitems(_Config(markexpr), [slow, quick])
    assert quick.added == []
    reasons = [m.kwargs.get("reason", "") for m in slow.added]
    if slow_runs:
        assert reasons == []
    else:
        assert len(reasons) == 1 and "opt in with -m slow" in reasons[0]
