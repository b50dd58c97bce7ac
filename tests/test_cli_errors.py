"""The command's error contract: input errors are one line naming what is at fault, exit 2."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from regionmed_fast.errors import MissingDependency, require


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "regionmed_fast.cli", *args], capture_output=True,
                          text=True)


def test_bad_manifest_line_is_one_line_naming_file_and_line(tmp_path):
    (tmp_path / "annotations.jsonl").write_text(json.dumps({"image": "a.jpg"}) + "\n{not json\n")
    p = _run("validate", str(tmp_path))
    assert p.returncode != 0 and "Traceback" not in p.stdout + p.stderr
    assert "annotations.jsonl:2: error: bad_json" in p.stdout
    assert "annotations.jsonl:1: error: missing_field: missing required field 'width'" in p.stdout


def test_bad_stage_file_is_one_line(tmp_path):
    cfg = tmp_path / "stages.yaml"
    cfg.write_text("stages:\n  - {name: g, losses: {global: 1}, epochs: 1, typo_key: 3}\n")
    p = _run("train", "--config", str(cfg), "--data", str(tmp_path), "--out", str(tmp_path / "o"))
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in p.stderr
    assert str(cfg) in lines[0] and "typo_key" in lines[0]


def test_require_names_the_extra():
    assert require("json", extra="x", purpose="p") is json
    with pytest.raises(MissingDependency, match=r"the demo needs the package 'no_such_pkg_xyz'.*"
                                                r"pip install 'regionmed-fast\[text\]'"):
        require("no_such_pkg_xyz", extra="text", purpose="the demo")


def test_timm_backbone_without_timm_names_the_extra(monkeypatch):
    from regionmed_fast.model.vit import TimmBackbone, VisionConfig
    monkeypatch.setitem(sys.modules, "timm", None)  # import of timm now fails as if absent
    with pytest.raises(MissingDependency, match=r"vision.timm='vit_tiny_patch16_224' needs the "
                                                r"package 'timm'.*regionmed-fast\[timm\]"):
        TimmBackbone(VisionConfig(timm="vit_tiny_patch16_224"))
