"""``regionmed-fast demo`` (regionmed_fast/apps/demo.py): a tiny end-to-end run with the headline
rows (global + proposed boxes) and the oracle rows apart, differences never claimed from one
seed, the figures optional, and a missing dependency said in one line before any work."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

TINY_RUN = """
model: regionmed-tiny
model_args: {text: tiny, image_size: 32, embed_dim: 32, roi: {heads: 1},
             vision: {patch_size: 8, width: 32, depth: 1, heads: 1}}
image_size: 32
batch_size: 8
lr: 1.0e-3
precision: fp32
log_every: 1
save_every: 1000
stages:
  - {name: global, steps: 1, losses: {global: 1.0}}
  - {name: region, steps: 1, losses: {global: 1.0, region: 1.0}}
  - {name: hierarchical, steps: 1, losses: {global: 1.0, region: 1.0, fused: 1.0},
     hard_negative_beta: 0.5}
"""


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


# what `pip install regionmed-fast` does not bring (the extras, and what only tests use)
NOT_CORE = ("torchvision", "matplotlib", "tensorboard", "simplejpeg", "webdataset", "open_clip",
            "timm", "nvidia.dali", "sklearn", "hypothesis")


def test_demo_tiny_run_on_a_core_install(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY_RUN)
    out_dir = tmp_path / "out"
    code = (f"import sys\nfor m in {NOT_CORE!r}: sys.modules[m] = None\n"
            "from regionmed_fast.cli import main\n"
            f"sys.exit(main(['demo', '--out', {str(out_dir)!r}, '--config', {str(cfg)!r}, "
            "'--n', '48', '--size', '32', '--no-progress']))")
    rc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True,
                        timeout=600)
    assert rc.returncode == 0, rc.stdout[-2000:] + rc.stderr[-3000:]
    out = rc.stdout
    table = out[out.index("4/4 results"):out.index("[demo] differences")]
    for row in ("region-aware: global embedding", "region-aware: proposed boxes",
                "global-only: global embedding"):
        assert row in table
    assert "oracle" not in table  # annotated boxes never in the headline
    diffs = out[out.index("[demo] differences"):out.index("Oracle boxes")]
    lines = [ln for ln in diffs.splitlines() if ln.startswith("  * ")]
    assert lines and all("one seed: cannot be told apart" in ln and "95 % interval" in ln
                         for ln in lines)
    assert "beats" not in out
    assert "region-aware: oracle boxes" in out[out.index("Oracle boxes"):]
    assert out.count("figures skipped: matplotlib is not installed") == 1
    rep = out_dir / "report"
    assert sorted(p.name for p in rep.iterdir()) == ["report.md", "results.json"]
    saved = json.loads((rep / "results.json").read_text())
    assert set(saved["results"]["region-aware"]["zeroshot"]) == {"global", "proposed_boxes"}
    assert "oracle_boxes" in saved["results"]["region-aware"]["oracle"]["zeroshot"]
    assert "oracle" not in saved["results"]["global-only"]
    assert all(d["verdict"] == "one seed: cannot be told apart" for d in saved["differences"])
    md = (rep / "report.md").read_text()
    assert md.index("## Differences") < md.index("## Oracle boxes")


def test_demo_says_what_is_missing_before_any_work(tmp_path):
    code = ("import sys; sys.modules['transformers'] = None; "
            "from regionmed_fast.cli import main; "
            f"sys.exit(main(['demo', '--out', {str(tmp_path / 'out')!r}]))")
    rc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True,
                        timeout=300)
    assert rc.returncode == 2, rc.stderr[-2000:]
    err = rc.stderr.strip().splitlines()
    assert len(err) == 1 and "pip install transformers" in err[0], err
    assert not (tmp_path / "out").exists()  # no work was done


def test_demo_lives_in_apps():
    from regionmed_fast.cli import COMMANDS
    assert COMMANDS["demo"][0] == "regionmed_fast.apps.demo:cli_main"
    assert not (REPO / "regionmed_fast" / "train" / "demo.py").exists()


@pytest.mark.slow
def test_demo_figures(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from regionmed_fast.apps import demo

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY_RUN)
    assert demo.cli_main(["--out", str(tmp_path / "out"), "--config", str(cfg), "--n", "48",
                          "--size", "32", "--no-progress"]) == 0
    rep = tmp_path / "out" / "report"
    assert {"loss_curves.png", "accuracy_by_lesion_size.png", "examples.png"} <= {
        p.name for p in rep.iterdir()}
