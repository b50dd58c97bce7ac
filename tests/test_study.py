"""The study (regionmed_fast/apps/study.py, scripts/real_data_eval.py): splits carved without the
test images, lever selection on val, paired seeds scored on the same items, verdicts from the
interval only, runs reused, and the README / docs blocks rendered from the results file."""
from __future__ import annotations

import json
import pathlib

import pytest
import torch

from regionmed_fast.apps import study as S
from regionmed_fast.apps import study_report as R
from regionmed_fast.data.manifest import read_manifest
from regionmed_fast.eval.compare import HELPS, HURTS, ONE_SEED, TIED

REPO = pathlib.Path(__file__).resolve().parents[1]
VERDICTS = {HELPS, HURTS, TIED}


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    rc = S.main(["--budget", "tiny", "--datasets", "synthetic", "--levers", "fused",
                 "--select-seeds", "100", "--seeds", "0,1,2", "--threads", "1", "--out", str(out)])
    assert rc == 0
    return out, json.loads((out / "study.json").read_text())


def _splits(folder: pathlib.Path) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for r in read_manifest(str(folder)):
        out.setdefault(r["split"], set()).add(r["image"])
    return out


def test_phases_never_train_or_select_on_test(tiny_study):
    out, res = tiny_study
    sel, fin = _splits(out / "synthetic/data/select"), _splits(out / "synthetic/data/final")
    assert set(sel) == {"train", "val", "test"} and set(fin) == {"train", "test"}
    assert sel["test"] == fin["test"]  # the same test images in both phases
    assert not (sel["val"] & sel["test"]) and not (sel["train"] & sel["test"])
    assert fin["train"] == sel["train"] | sel["val"]  # the final runs train on train + val
    # the synthetic set carries its own split: the study keeps its test side
    own = {r["image"] for r in read_manifest(str(out / "synthetic/source")) if r["split"] == "test"}
    assert fin["test"] == own
    info = res["study"]["datasets"]["synthetic"]
    assert info["select"]["val"]["images"] == len(sel["val"])


def test_selection_on_val_and_final_paired_on_the_same_items(tiny_study):
    out, res = tiny_study
    d = res["selection"]["per_dataset"]["synthetic"]
    (group,) = d["groups"]
    assert [c["setting"]["fused"] for c in group["candidates"]] == [1.0, 0.0]
    assert res["final"]["synthetic"]["setting"] == d["chosen"]
    # selection runs score val; final runs score test
    runs = sorted(out.glob("synthetic/*/*/seed*/run.json"))
    phases = {json.loads(p.read_text())["fingerprint"]["eval_split"] for p in runs}
    assert phases == {"val", "test"}
    f = res["final"]["synthetic"]
    seeds = [r["seed"] for r in f["runs"][S.REGION]]
    assert seeds == [r["seed"] for r in f["runs"][S.BASELINE]] == [0, 1, 2]
    got = {(c["metric"], c["row"]) for c in f["comparisons"]}
    assert {(m, row) for m in S.HEADLINE for row in S.ROWS} <= got
    for c in f["comparisons"]:
        assert c["n_seeds"] == 3 and c["verdict"] in VERDICTS
        lo, hi = c["ci95"]
        want_v = HELPS if lo > 0 else HURTS if hi < 0 else TIED
        assert c["verdict"] == want_v
        assert c["diff"] == pytest.approx(sum(c["per_seed_diff"]) / 3)
    # every run was scored on the same items (keys), fixed by the evaluation seed
    items = [torch.load(p.with_name("items.pt"), weights_only=True)
             for p in runs if json.loads(p.read_text())["phase"] == "final"]
    for key in ("i2t_r10", "zs_auroc", "vqa_acc"):
        assert all(v[key]["keys"] == items[0][key]["keys"] for v in items)
    # the lesion-size rows of the synthetic set
    assert {c["metric"] for c in f["comparisons"]} >= {"zs_acc_small", "zs_acc_large"}


def test_rerun_reuses_runs(tiny_study, capsys):
    out, res = tiny_study
    rc = S.main(["--budget", "tiny", "--datasets", "synthetic", "--levers", "fused",
                 "--select-seeds", "100", "--seeds", "0,1,2", "--threads", "1", "--out", str(out),
                 "--results", str(out / "again.json")])
    assert rc == 0
    printed = capsys.readouterr().out
    assert printed.count("(reused)") == 2 + 6 and "train " not in printed.split("study:")[0]
    again = json.loads((out / "again.json").read_text())
    assert again["final"]["synthetic"]["comparisons"] == res["final"]["synthetic"]["comparisons"]


def test_printed_and_rendered_text_follows_the_intervals(tiny_study):
    _, res = tiny_study
    lines = R.summary_lines(res)
    assert len(lines) == 1 + len(res["final"]["synthetic"]["comparisons"])
    for ln, c in zip(lines[1:], res["final"]["synthetic"]["comparisons"]):
        assert ln.endswith(c["verdict"]) and "over 3 seeds" in ln
    # the augmentation is stated from the results; results without the field had none
    assert "augmentation: box-aware random resized crop" in R.budget_line(res)
    old = json.loads(json.dumps(res))
    del old["study"]["augmentation"]
    assert "no augmentation" in R.budget_line(old)
    md = R.markdown(res, None)
    assert "oracle boxes" in md.split("## Oracle boxes")[1] and R.FIGURE_MISSING in md
    assert "No region-to-global attention lever exists" in md
    block = R.readme_block(res)
    assert "synthetic" in block and ("cannot be told apart" in block or "helps" in block
                                     or "hurts" in block)
    # a one-seed result never reads as a finding
    one = json.loads(json.dumps(res))
    for c in one["final"]["synthetic"]["comparisons"]:
        c.update(verdict=ONE_SEED, n_seeds=1, ci95=[0.1, 0.2], diff=0.15)
    assert "helps" not in R.readme_block(one) and "one seed: cannot be told apart" in R.readme_block(one)


def test_lesion_sizes_only_where_annotated(tmp_path):
    from regionmed_fast.data.synthetic import write_dataset

    write_dataset(tmp_path / "s", n=12, size=32, seed=0)
    sizes = S.lesion_sizes(tmp_path / "s")
    assert set(sizes.values()) <= {"small", "medium", "large", "normal"} and len(sizes) == 12
    # the same manifest without size classes (as the real sets): no size rows
    plain = tmp_path / "p"
    plain.mkdir()
    (plain / "images").symlink_to(tmp_path / "s" / "images")
    lines = [json.loads(ln) for ln in (tmp_path / "s/annotations.jsonl").read_text().splitlines()]
    for r in lines:
        for reg in r.get("regions") or ():
            reg.pop("size_class", None)
    (plain / "annotations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert S.lesion_sizes(plain) is None


def test_schedule_keeps_the_global_stage_past_the_plateau():
    cfg = S.run_config(S.Setting(), S.BUDGETS["small"], seed=0)
    assert [s.name for s in cfg.stages] == ["global", "region", "hierarchical"]
    assert cfg.stages[0].steps >= 150 and sum(s.steps for s in cfg.stages) == S.BUDGETS["small"].steps
    assert "fused" in cfg.stages[2].losses and cfg.stages[2].hard_negative_beta == 0.5
    base = S.run_config(S.Setting(), S.BUDGETS["small"], seed=0, variant=S.BASELINE)
    assert [s.steps for s in base.stages] == [s.steps for s in cfg.stages]
    assert all(s.losses == {"global": 1.0} for s in base.stages)
    off = S.run_config(S.Setting(fused=0.0), S.BUDGETS["small"], seed=0)
    assert "fused" not in off.stages[2].losses
    # text tower frozen, its projection trained
    assert all(s.frozen == ["text"] for s in cfg.stages)


def test_docs_blocks_match_the_results_file():
    path = REPO / R.RESULTS_JSON
    if not path.is_file():
        pytest.skip(f"{R.RESULTS_JSON} not written yet")
    res = json.loads(path.read_text())
    for rel, markers, render in (("README.md", R.README_BLOCK, R.readme_block),
                                 ("docs/evaluation.md", R.DOCS_BLOCK, R.docs_block)):
        text = (REPO / rel).read_text()
        assert R.replace_block(text, render(res), markers, rel) == text, (
            f"{rel} is out of date with {R.RESULTS_JSON}: run python benchmarks/run_all.py --readme-only")


def test_real_data_study_split_keeps_patients_apart(shared_data, tmp_path):
    """The study's manifests of the shared sets: no patient on two sides, test the project's
    split rule, val carved out of the training groups only."""
    from regionmed_fast.data.split import select_split

    for name, key in S.REAL_DATASETS.items():
        info = S.prepare_dataset(shared_data / name, tmp_path / name, key)
        sel = read_manifest(str(tmp_path / name / "select"))
        side: dict = {}
        for r in sel:
            side.setdefault(r.get("patient_id", r["image"]), set()).add(r["split"])
        assert all(len(v) == 1 for v in side.values()), name
        # test = what `eval --split test` takes from the original manifest by the same rule
        plain = [r for r in read_manifest(str(shared_data / name)) if "split" not in r]
        want = {r["image"] for r in select_split(plain, "test")}
        assert {r["image"] for r in sel if r["split"] == "test"} == want, name
        n = len(sel)
        assert 0.05 < info["select"]["val"]["images"] / n < 0.3, name
        assert info["final"]["train"]["images"] == info["select"]["train"]["images"] + \
            info["select"]["val"]["images"]
