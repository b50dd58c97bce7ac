"""The train-step comparison with OpenCLIP (benchmarks/bench_train.py): the same code that runs
OpenCLIP's ViT-B-16 beside ours on a GPU runs here at a tiny size, one optimizer step each."""
from __future__ import annotations

import importlib
import json
import math
import pathlib
import sys

import pytest
import torch

pytest.importorskip("open_clip", reason="open_clip (open-clip-torch) is not installed: the "
                    "OpenCLIP baseline cannot be built")
BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny steps: on a shared 2-core machine two OpenMP threads wait on each other 20x longer
    # than the work takes
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def bt():
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module("bench_train")


def test_each_step_trains_its_model_once(bt):
    steps = bt.openclip_steps(bt.OPENCLIP_TINY, "cpu", None)
    assert list(steps) == ["OpenCLIP tiny CLIP", "ours global-only", "ours region-aware"]
    assert steps["ours global-only"].model.roi is None and steps["ours region-aware"].model.roi is not None
    import open_clip

    tok = bt.get_tokenizer_for(steps["ours global-only"].model)
    batches = bt.clip_batches(2, 2, 64, tok, open_clip.tokenize, "cpu")
    for key in ("images", "text_ids", "region_text_ids", "openclip_text", "boxes"):
        assert batches[0][key].shape == batches[1][key].shape, key  # one shape: nothing re-tunes
    assert batches[0]["openclip_text"].shape == (2, 77) and batches[0]["boxes"].shape == (2, 4, 4)
    for name, step in steps.items():
        before = [p.detach().clone() for p in step.model.parameters()]
        loss = step(batches[0])
        assert loss.ndim == 0 and math.isfinite(float(loss)), name
        changed = sum(not torch.equal(a, p) for a, p in zip(before, step.model.parameters()))
        assert changed > 0.5 * len(before), (name, changed, len(before))
        assert all(p.grad is None for p in step.model.parameters()), name  # zero_grad(set_to_none)


def test_blocks_mode_compiles_the_repeated_blocks_only(bt):
    from regionmed_fast.model import create_model

    model = create_model("regionmed-tiny", text="tiny", image_size=64)
    assert bt.compile_model(model, "none") is model
    bt.compile_model(model, "blocks")
    compiled = {n for n, m in model.named_modules() if getattr(m, "_compiled_call_impl", None) is not None}
    assert {f"visual.blocks.{i}" for i in range(len(model.visual.blocks))} <= compiled
    assert "text.transformer.encoder.layer.0" in compiled
    assert not any(n.startswith("roi") for n in compiled) and "visual" not in compiled
    with pytest.raises(ValueError, match="compile mode"):
        bt.compile_model(model, "fast")


def test_main_writes_the_comparison_groups(bt, tmp_path):
    rc = bt.main(["--device", "cpu", "--only-openclip", "--openclip", "on", "--quick", "--repeats", "1",
                  "--out", str(tmp_path)])
    assert rc == 0
    (js,) = tmp_path.glob("*-train.json")
    payload = json.loads(js.read_text())
    rows = {r["name"]: r for r in payload["results"]}
    assert set(rows) == {"OpenCLIP tiny CLIP", "ours global-only", "ours region-aware"}
    assert all(not r["error"] and r["meta"]["samples_per_s"] > 0 for r in rows.values())
    assert rows["ours global-only"]["ratios"]["speedup vs OpenCLIP tiny CLIP"] > 0
    assert rows["ours region-aware"]["ratios"]["vs ours global-only"] > 0
    assert payload["openclip_comparison"]["compile_mode"] == "none"
    assert all(r["group"].endswith("eager") for r in rows.values())
