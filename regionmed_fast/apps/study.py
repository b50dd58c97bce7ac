"""The study: does region-aware training help? RegionMed-CLIP against the global-only baseline.

For each dataset (the shared real sets and the synthetic phantoms) the region-aware model
(progressive global -> region -> hierarchical stages, hard negatives) and the global-only
baseline (``RunConfig.as_baseline()``: the same stages, steps, batch, image size and learning
rates with the global loss only and no RoI processor) are trained with the same seeds, then
scored on the held-out test split on the headline rows, which use no annotation: each model's
global embedding, and the region-aware embedding with the model's own proposed boxes
(``encode_image(images, boxes="auto")``). Metrics: image-to-text and text-to-image R@10,
zero-shot macro AUROC, VQA accuracy. Differences (region-trained minus global-only) get a
two-level paired bootstrap interval over seeds and test items and a verdict
(``regionmed_fast.eval.compare``). Annotated boxes appear only in rows named "oracle boxes".

Before that, the levers (stage order and length, the region and fused loss weights, the
hard-negative beta) are chosen
greedily, one group at a time, on a validation split carved out of the training data only,
with fewer seeds. The split: :func:`regionmed_fast.data.split.record_split` (``patient_id``
where present, else the image) gives test and val; records that carry their own ``split``
(the synthetic set) keep their test, and val takes the same share of their training groups by
the same group hash. Each phase gets a manifest with an explicit ``split`` per record (the
images are linked, never copied): ``select/`` (train / val / test) and ``final/`` (train = train
+ val, the same test). Nothing of the test split is seen before the final phase.

No region-to-global attention lever exists: the RoI processor's attention (the global token
attending over its image's regions) produces only the fused, region-aware embedding, which the
fused loss trains; the global embedding never sees a region token, so region training can reach
it only through the shared vision tower.

    python scripts/real_data_eval.py --budget small --out runs/study       # the CPU study
    python scripts/real_data_eval.py --budget full --datasets synthetic     # GPU-sized
    python scripts/real_data_eval.py --from-json docs/results/study.json --readme

A run whose ``run.json`` exists with the same settings is reused, so a study that was cut short
continues where it stopped. Report: ``regionmed_fast.apps.study_report``.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import pathlib
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

from regionmed_fast.data.manifest import read_manifest
from regionmed_fast.data.split import group_hash, group_of, record_split
from regionmed_fast.eval.compare import RESAMPLING, paired_seed_difference

REAL_DATASETS = {"covid_chestxray": "patient_id", "ph2_dermoscopy": None}  # name: group key
SYNTHETIC = "synthetic"
DATASETS = (*REAL_DATASETS, SYNTHETIC)
REGION, BASELINE = "region-aware", "global-only"
GLOBAL, PROPOSED = "global", "proposed_boxes"
ROWS = (GLOBAL, PROPOSED)
ROW_LABELS = {GLOBAL: "global embedding", PROPOSED: "proposed boxes", "oracle_boxes": "oracle boxes"}
# metric key: (label, task, kind of compare.paired_seed_difference)
METRICS = {
    "i2t_r10": ("image-to-text R@10", "retrieval", "mean"),
    "t2i_r10": ("text-to-image R@10", "retrieval", "mean"),
    "zs_auroc": ("zero-shot macro AUROC", "zeroshot", "macro_auroc"),
    "vqa_acc": ("VQA accuracy", "vqa", "mean"),
}
HEADLINE = tuple(METRICS)  # the selection criterion and the verdict grid
# the synthetic set's lesion-size breakdown: top-1 zero-shot accuracy over the test images
# grouped by their largest finding (regionmed_fast.apps.demo.size_group)
SIZES = ("small", "medium", "large")
METRICS.update({f"zs_acc_{g}": (f"zero-shot accuracy, {g} lesions", "zeroshot", "mean")
                for g in SIZES})
TASKS = ("retrieval", "zeroshot", "vqa")
FROZEN = ["text"]  # the pretrained MiniLM tower stays fixed (cached); text_proj trains
SELECT_SEEDS = (100, 101)  # disjoint from the final seeds
FINAL_SEEDS = (0, 1, 2, 3, 4)
TEST_FRACTION, VAL_FRACTION = 0.3, 0.15
# the trainer's data path: part of every run's fingerprint, so runs of an earlier path (no
# augmentation) are never reused
PIPELINE = "data.make_loader: box-aware random resized crop, side-aware flips"

SCHEDULES = {
    # name: [(stage, share of the steps)]; every stage after "global" adds the region loss,
    # "hierarchical" the fused loss and the hard negatives
    # the global stage is long enough to leave the modality plateau before regions come in
    "progressive": [("global", 0.75), ("region", 0.125), ("hierarchical", 0.125)],
    "joint": [("hierarchical", 1.0)],
}


@dataclass(frozen=True)
class Setting:
    """The levers of one region-aware recipe (the baseline follows its schedule)."""

    schedule: str = "progressive"
    region: float = 1.0  # weight of the region loss (region <-> region text)
    fused: float = 1.0   # weight of the fused loss: trains the attention behind the fused embedding
    beta: float = 0.5    # hard-negative beta of the hierarchical stage (HN-NCE; 0 = InfoNCE)

    @property
    def name(self) -> str:
        return f"{self.schedule} region {self.region:g} fused {self.fused:g} beta {self.beta:g}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# lever groups tried in this order, each with the best of the groups before it
LEVERS = {
    "weights": ("region and fused loss weights", [{"region": 1.0, "fused": 1.0},
                                                  {"region": 2.0, "fused": 2.0}]),
    "fused": ("fused loss off", [{"fused": 0.0}]),
    "beta": ("hard-negative beta", [{"beta": 0.5}, {"beta": 0.0}]),
    "schedule": ("stage order (progressive, or every loss from the first step)",
                 [{"schedule": s} for s in SCHEDULES]),
}
TINY_MODEL = {"text": "tiny", "image_size": 32, "embed_dim": 32, "roi": {"heads": 1},
              "vision": {"patch_size": 8, "width": 32, "depth": 1, "heads": 1}}


@dataclass(frozen=True)
class Budget:
    """What every run of the study gets (the same for both models)."""

    steps: int                 # optimizer steps of the whole run (all stages)
    batch_size: int = 32
    image_size: int = 128
    lr: float = 1e-3
    warmup: float = 0.1
    model: str = "regionmed-tiny"
    model_args: dict = field(default_factory=dict)
    synthetic_n: int = 1000    # phantoms written for the synthetic set (train + test)
    synthetic_size: int = 128
    num_workers: int | None = None  # None: the trainer's default
    cache_mb: int = 512        # decoded-sample cache of the training loader (per process)
    n_boot: int = 2000         # resamples of the study's intervals

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


BUDGETS = {
    # the tests: a test-sized model and data
    "tiny": Budget(steps=3, batch_size=8, image_size=32, model_args=TINY_MODEL, synthetic_n=60,
                   synthetic_size=32, num_workers=0, n_boot=200),
    # the CPU study (docs/evaluation.md)
    "small": Budget(steps=200, image_size=96, synthetic_n=600, num_workers=0),
    # one GPU: the same model and data, more steps and a larger batch
    "full": Budget(steps=1500, batch_size=64),
}


# ---------------------------------------------------------------- data
def study_split(rec: dict, group_key: str | None, test_fraction: float = TEST_FRACTION,
                val_fraction: float = VAL_FRACTION) -> str:
    """train / val / test for one record (see the module docstring)."""
    own = rec.get("split")
    if own is None:
        return record_split(rec, group_key=group_key, test_fraction=test_fraction,
                            val_fraction=val_fraction)
    side = record_split(rec)  # its own field, normalised
    if side == "train" and group_hash(group_of(rec, group_key)) < val_fraction / (1 - test_fraction):
        return "val"
    return side


def _link(src: pathlib.Path, dst: pathlib.Path) -> None:
    if dst.is_symlink() or dst.exists():
        if dst.is_symlink() and dst.resolve() == src.resolve():
            return
        dst.unlink() if dst.is_symlink() or dst.is_file() else shutil.rmtree(dst)
    dst.symlink_to(src.resolve(), target_is_directory=src.is_dir())


def prepare_dataset(src: pathlib.Path, dst: pathlib.Path, group_key: str | None) -> dict:
    """``dst/select`` and ``dst/final``: manifests with an explicit split, linked images.
    Returns the images and groups per split of both phases."""
    lines = [json.loads(ln) for ln in (src / "annotations.jsonl").read_text().splitlines()
             if ln.strip()]
    records = read_manifest(str(src))  # validated, in the order of the lines
    if len(records) != len(lines):
        raise ValueError(f"{src}: {len(lines)} manifest lines but {len(records)} records")
    sides = [study_split(r, group_key) for r in records]
    info: dict = {"source": str(src), "group_key": group_key or "patient_id, else the image",
                  "test_fraction": TEST_FRACTION, "val_fraction": VAL_FRACTION}
    for phase, rename in (("select", {}), ("final", {"val": "train"})):
        d = dst / phase
        d.mkdir(parents=True, exist_ok=True)
        with open(d / "annotations.jsonl", "w") as fh:
            for line, side in zip(lines, sides):
                fh.write(json.dumps({**line, "split": rename.get(side, side)}) + "\n")
        for extra in ("images", "qa.jsonl"):
            if (src / extra).exists():
                _link(src / extra, d / extra)
        counts = {}
        for s in ("train", "val", "test"):
            recs = [r for r, side in zip(records, sides) if rename.get(side, side) == s]
            if recs:
                counts[s] = {"images": len(recs),
                             "groups": len({group_of(r, group_key) for r in recs})}
        info[phase] = counts
    return info


def dataset_sources(args, budget: Budget, out: pathlib.Path) -> dict[str, pathlib.Path]:
    """Source folder per dataset to study; a missing real folder is skipped with one line."""
    root = pathlib.Path(args.data_root)
    srcs = {}
    for name in args.datasets:
        if name == SYNTHETIC:
            from regionmed_fast.data.synthetic import write_dataset

            d = out / SYNTHETIC / "source"
            stamp = d / "written.json"
            want = {"n": budget.synthetic_n, "size": budget.synthetic_size, "seed": 0}
            if not (stamp.is_file() and json.loads(stamp.read_text()) == want):
                if d.exists():
                    shutil.rmtree(d)
                write_dataset(d, n=want["n"], size=want["size"], seed=want["seed"])
                stamp.write_text(json.dumps(want))
            srcs[name] = d
        elif (root / name / "annotations.jsonl").is_file():
            srcs[name] = root / name
        else:
            print(f"study: skipping {name}: {root / name} has no annotations.jsonl "
                  "(set --data-root)", flush=True)
    return srcs


# ---------------------------------------------------------------- runs
def run_config(setting: Setting, budget: Budget, seed: int, variant: str = REGION):
    """The RunConfig of one run; the baseline is ``as_baseline()`` of the region-aware one."""
    from regionmed_fast.train.stages import RunConfig, Stage

    if setting.schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {setting.schedule!r}; known: {sorted(SCHEDULES)}")
    parts = SCHEDULES[setting.schedule]
    lengths = [max(1, round(share * budget.steps)) for _, share in parts[:-1]]
    lengths.append(max(1, budget.steps - sum(lengths)))
    stages = []
    for (name, _), steps in zip(parts, lengths):
        losses = {"global": 1.0}
        if name in ("region", "hierarchical") and setting.region > 0:
            losses["region"] = setting.region
        if name == "hierarchical" and setting.fused > 0:
            losses["fused"] = setting.fused
        stages.append(Stage(name=name, steps=steps, losses=losses, frozen=list(FROZEN),
                            warmup=budget.warmup,
                            hard_negative_beta=setting.beta if name == "hierarchical" else 0.0))
    kw = {} if budget.num_workers is None else {"num_workers": budget.num_workers}
    cfg = RunConfig(stages=stages, model=budget.model, model_args=dict(budget.model_args),
                    image_size=budget.image_size, batch_size=budget.batch_size, seed=seed,
                    lr=budget.lr, weight_decay=0.05, precision="auto", save_every=10 ** 9,
                    log_every=1, cache_mb=budget.cache_mb, **kw)
    return cfg.as_baseline() if variant == BASELINE else cfg


def augmentation(budget: Budget) -> dict:
    """The training augmentation every run of the study gets (from its RunConfig)."""
    cfg = run_config(Setting(), budget, seed=0)
    return {"pipeline": PIPELINE, "crop_scale": list(cfg.crop_scale), "flip_p": cfg.flip_p}


def _curve(history: list[dict]) -> dict:
    """Per-step losses of one run, by stage (3 decimals)."""
    stages: list[dict] = []
    for h in history:
        if not stages or stages[-1]["name"] != h["stage"]:
            stages.append({"name": h["stage"], "loss": [], "parts": {}})
        st = stages[-1]
        st["loss"].append(round(float(h["loss"]), 3))
        for k, v in h.items():
            if k.startswith("loss_"):
                st["parts"].setdefault(k[5:], []).append(round(float(v), 3))
    return {"stages": stages}


def item_values(res: dict, size_of: dict[str, str] | None = None) -> dict:
    """Per metric: the item keys, per row the per-item values (and zero-shot's targets).
    ``size_of``: image -> size group; adds the per-group zero-shot accuracies (``SIZES``)."""
    items = res.get("items", {})
    out: dict = {}
    r = items.get("retrieval")
    if r:
        out["i2t_r10"] = {"keys": r["image_keys"], "rows": {
            row: (v <= 10).double() for row, v in r["image_to_text"].items()}}
        out["t2i_r10"] = {"keys": r["text_keys"], "rows": {
            row: (v <= 10).double() for row, v in r["text_to_image"].items()}}
    z = items.get("zeroshot")
    if z:
        out["zs_auroc"] = {"keys": z["image_keys"], "y": z["y"], "rows": dict(z["scores"])}
        for g in SIZES if size_of else ():
            keep = [i for i, k in enumerate(z["image_keys"]) if size_of.get(k) == g]
            if keep:
                ix = torch.tensor(keep)
                out[f"zs_acc_{g}"] = {"keys": [z["image_keys"][i] for i in keep], "rows": {
                    row: (sc[ix].argmax(1) == z["y"][ix]).double()
                    for row, sc in z["scores"].items()}}
    v = items.get("vqa")
    if v:
        out["vqa_acc"] = {"keys": v["keys"], "rows": dict(v["correct"]),
                          "blank": dict(v["blank_correct"])}
    return out


def summarize(res: dict, values: dict) -> dict:
    """The numbers of one run (JSON-able): each metric per row, controls, the oracle rows."""
    from regionmed_fast.eval.compare import metric_value

    m: dict = {}
    for key, (_, _, kind) in METRICS.items():
        if key in values:
            m[key] = {row: metric_value(kind, t, values[key].get("y"))
                      for row, t in values[key]["rows"].items()}
    ctl: dict = {}
    if "vqa_acc" in values:
        ctl["vqa_blank_image"] = {row: float(t.mean()) for row, t in values["vqa_acc"]["blank"].items()}
        ctl["vqa_question_prior"] = res["vqa"]["prior_baseline"]["accuracy"]
    z = res.get("zeroshot", {})
    if "majority_baseline" in z:
        ctl["zs_classes"] = z["classes"]
        ctl["zs_support"] = z["support"]
    r = res.get("retrieval", {})
    if "n_unique_texts" in r:
        ctl["n_unique_texts"] = r["n_unique_texts"]
    out = {"metrics": m, "controls": ctl, "n_images": res["n_images"]}
    o = res.get("oracle")
    if o and "skipped" not in o:
        orow = {}
        for row in o["rows"]:
            orow[row] = {
                "i2t_r10": o["retrieval"]["image_to_text"][row]["R@10"],
                "t2i_r10": o["retrieval"]["text_to_image"][row]["R@10"],
                "zs_auroc": o.get("zeroshot", {}).get("by_embedding", {}).get(row, {}).get(
                    "macro_auroc")}
        out["oracle"] = {"n_images": o["n_images"], "rows": orow}
    elif o:
        out["oracle"] = {"skipped": o["skipped"]}
    return out


@dataclass
class Job:
    dataset: str
    phase: str        # "select" (scored on val) or "final" (scored on test)
    data_dir: pathlib.Path
    setting: Setting
    variant: str
    seed: int
    budget: Budget
    out: pathlib.Path

    @property
    def eval_split(self) -> str:
        return "val" if self.phase == "select" else "test"

    def fingerprint(self) -> dict:
        cfg = run_config(self.setting, self.budget, self.seed, self.variant)
        manifest = (self.data_dir / "annotations.jsonl").read_bytes()
        return {"config": cfg.fingerprint(), "pipeline": PIPELINE,
                "phase": self.phase, "eval_split": self.eval_split,
                "manifest_sha1": hashlib.sha1(manifest).hexdigest(),
                "n_boot": self.budget.n_boot}


def run_job(job: Job, device: str | None, keep_models: bool = False) -> dict:
    """Train one model, evaluate it; ``run.json`` + ``items.pt`` in ``job.out`` (reused when
    they exist for the same fingerprint). Returns ``{"summary", "curve", "values", ...}``."""
    from regionmed_fast.eval import evaluate
    from regionmed_fast.train.trainer import Trainer, build_model

    fp = job.fingerprint()
    meta_path, items_path = job.out / "run.json", job.out / "items.pt"
    if meta_path.is_file() and items_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("fingerprint") == json.loads(json.dumps(fp)):
            meta["values"] = torch.load(items_path, weights_only=True)
            meta["reused"] = True
            return meta
    if job.out.exists():
        shutil.rmtree(job.out)
    cfg = run_config(job.setting, job.budget, job.seed, job.variant)
    t0 = time.time()
    torch.manual_seed(job.seed)  # both variants start from the same towers and projections
    model, tokenizer = build_model(cfg)
    trainer = Trainer(cfg, str(job.data_dir), str(job.out / "train"), model=model,
                      tokenizer=tokenizer, device=device, progress=False, split="train",
                      tensorboard=False, verbose=False)
    summary = trainer.fit()
    train_s = time.time() - t0
    t0 = time.time()
    res = evaluate(trainer.model, job.data_dir, tasks=TASKS, split=job.eval_split,
                   tokenizer=tokenizer, image_size=job.budget.image_size, batch_size=64, seed=0,
                   n_boot=50, oracle=job.phase == "final", items=True)
    values = item_values(res, lesion_sizes(job.data_dir))
    meta = {"fingerprint": fp, "dataset": job.dataset, "phase": job.phase,
            "setting": job.setting.to_dict(), "variant": job.variant, "seed": job.seed,
            "summary": summarize(res, values), "curve": _curve(summary["history"]),
            "steps": summary["global_step"], "train_s": train_s, "eval_s": time.time() - t0}
    if not keep_models:
        shutil.rmtree(job.out / "train", ignore_errors=True)
    job.out.mkdir(parents=True, exist_ok=True)
    torch.save(values, items_path)
    meta_path.write_text(json.dumps(_json(meta), indent=1))
    meta["values"] = values
    return meta


def lesion_sizes(data_dir: pathlib.Path) -> dict[str, str] | None:
    """image -> size group of its largest finding, where the records carry ``size_class`` (the
    synthetic phantoms); None otherwise."""
    from regionmed_fast.apps.demo import size_group

    recs = read_manifest(str(data_dir))
    if not any(reg.get("size_class") for r in recs for reg in r.get("regions") or ()):
        return None
    return {r["image"]: size_group(r) for r in recs}


def _json(x):
    from regionmed_fast.eval.report import clean

    return clean(x)


# ---------------------------------------------------------------- comparisons
def compare_runs(a_runs: list[dict], b_runs: list[dict], rows_a=ROWS, row_b: str = GLOBAL,
                 n_boot: int = 2000) -> list[dict]:
    """Each metric x row of A (seed-paired with B's ``row_b``): mean, sd, interval, verdict."""
    out = []
    seeds_a, seeds_b = [r["seed"] for r in a_runs], [r["seed"] for r in b_runs]
    if seeds_a != seeds_b:
        raise ValueError(f"runs are not paired by seed: {seeds_a} vs {seeds_b}")
    for key, (label, _, kind) in METRICS.items():
        if not all(key in r["values"] for r in a_runs + b_runs):
            continue
        keys = a_runs[0]["values"][key]["keys"]
        for r in a_runs + b_runs:
            if r["values"][key]["keys"] != keys:
                raise ValueError(f"{label}: the runs did not score the same items")
        y = a_runs[0]["values"][key].get("y")
        for row in rows_a:
            if row not in a_runs[0]["values"][key]["rows"]:
                continue
            d = paired_seed_difference([r["values"][key]["rows"][row] for r in a_runs],
                                       [r["values"][key]["rows"][row_b] for r in b_runs],
                                       kind, y, n_boot=n_boot, seed=0)
            d.pop("resampling")
            out.append({"metric": key, "label": label, "row": row, **d,
                        "model_a": f"{REGION}: {ROW_LABELS[row]}",
                        "model_b": f"{BASELINE}: {ROW_LABELS[row_b]}"})
    return out


def score(run: dict) -> float:
    """The selection criterion: the mean over the study's metrics and the headline rows."""
    vals = [v for k, m in run["summary"]["metrics"].items() if k in HEADLINE
            for row, v in m.items() if row in ROWS and v is not None and v == v]
    return statistics.fmean(vals) if vals else float("nan")


# ---------------------------------------------------------------- the phases
class Study:
    def __init__(self, args, budget: Budget, out: pathlib.Path, datasets: dict[str, pathlib.Path]):
        self.args, self.budget, self.out = args, budget, out
        self.data = {}
        self.info = {}
        for name, src in datasets.items():
            self.info[name] = prepare_dataset(src, out / name / "data",
                                              REAL_DATASETS.get(name))
            self.data[name] = out / name / "data"
        self.n_runs = 0
        self.t0 = time.time()

    def run(self, dataset: str, phase: str, setting: Setting, variant: str, seed: int) -> dict:
        # the baseline drops the region and fused losses: it follows the schedule and beta only
        name = (setting.name if variant == REGION else
                f"{setting.schedule} beta {setting.beta:g}").replace(" ", "_")
        job = Job(dataset, phase, self.data[dataset] / phase, setting, variant, seed, self.budget,
                  self.out / dataset / phase / f"{variant}-{name}" / f"seed{seed}")
        r = run_job(job, self.args.device, self.args.keep_models)
        self.n_runs += 1
        what = "reused" if r.get("reused") else f"train {r['train_s']:.0f} s, eval {r['eval_s']:.0f} s"
        print(f"[study {time.time() - self.t0:6.0f} s] {dataset} {phase} {variant} "
              f"{name.replace('_', ' ')} seed {seed}: "
              f"score {100 * score(r):.1f} ({what})", flush=True)
        return r

    def evaluate_setting(self, dataset: str, setting: Setting, seeds) -> dict:
        """Validation numbers of the region-aware model with one setting on one dataset. The
        baseline is not trained here: the levers are chosen for the region-aware model alone,
        on its own validation score."""
        reg = [self.run(dataset, "select", setting, REGION, s) for s in seeds]
        return {"setting": setting.to_dict(), "name": setting.name,
                "score": statistics.fmean(score(r) for r in reg),
                "per_seed_score": [score(r) for r in reg], "metrics": _mean_metrics(reg)}

    def select(self, groups: list[str], seeds) -> dict:
        """Per dataset, greedy, group by group: each group's candidates are the setting chosen
        so far and its variants; the best validation score wins (ties: the earlier candidate,
        so the chosen setting stays unless something beats it)."""
        out = {}
        for ds in self.data:
            best = Setting()
            steps, cache = [], {}
            for g in groups:
                title, cands = LEVERS[g]
                tried, seen = [], []
                # the setting chosen so far is always the first candidate (kept on a tie)
                for s in [best] + [dataclasses.replace(best, **c) for c in cands]:
                    if s in seen:
                        continue
                    seen.append(s)
                    if s not in cache:
                        cache[s] = self.evaluate_setting(ds, s, seeds)
                    tried.append(cache[s])
                win = max(range(len(tried)), key=lambda i: (tried[i]["score"], -i))
                best = Setting(**tried[win]["setting"])
                steps.append({"group": g, "title": title, "candidates": tried, "chosen": best.name})
                print(f"[study] {ds}: lever {title}: chose {best.name}", flush=True)
            out[ds] = {"groups": steps, "chosen": best.to_dict(), "chosen_name": best.name}
        return {"criterion": ("the region-aware model's validation score: the mean over "
                              "image-to-text R@10, text-to-image R@10, zero-shot macro AUROC and "
                              "VQA accuracy of its two headline rows (global, proposed boxes), "
                              f"over {len(seeds)} seeds, per dataset"),
                "seeds": list(seeds), "split": "val (carved out of the training data)",
                "per_dataset": out}

    def final(self, settings: dict[str, Setting], seeds) -> dict:
        out = {}
        for ds in self.data:
            setting = settings[ds]
            reg = [self.run(ds, "final", setting, REGION, s) for s in seeds]
            base = [self.run(ds, "final", setting, BASELINE, s) for s in seeds]
            out[ds] = {"setting": setting.to_dict(), "setting_name": setting.name,
                       "comparisons": compare_runs(reg, base, n_boot=self.budget.n_boot),
                       "runs": {REGION: [_slim(r) for r in reg], BASELINE: [_slim(r) for r in base]},
                       "curves": {REGION: _curves(reg), BASELINE: _curves(base)},
                       "plateau": plateau(self.data[ds] / "final", self.budget.batch_size),
                       "train_s": {REGION: [r["train_s"] for r in reg],
                                   BASELINE: [r["train_s"] for r in base]}}
        return out


def _mean_metrics(runs: list[dict]) -> dict:
    out: dict = {}
    for r in runs:
        for k, rows in r["summary"]["metrics"].items():
            for row, v in rows.items():
                out.setdefault(k, {}).setdefault(row, []).append(v)
    return {k: {row: statistics.fmean(v) for row, v in rows.items()} for k, rows in out.items()}


def _slim(run: dict) -> dict:
    return {"seed": run["seed"], "summary": run["summary"], "steps": run["steps"],
            "train_s": run["train_s"], "eval_s": run["eval_s"]}


def _curves(runs: list[dict]) -> dict:
    """Loss curves of one variant over its seeds: per stage, the per-seed total and global loss
    and the seed mean of each loss part."""
    stages = []
    for i, st in enumerate(runs[0]["curve"]["stages"]):
        per = [r["curve"]["stages"][i] for r in runs]
        n = min(len(p["loss"]) for p in per)
        parts = {k: [round(statistics.fmean(p["parts"][k][j] for p in per), 3) for j in range(n)]
                 for k in st["parts"]}
        stages.append({"name": st["name"], "steps": n,
                       "loss_per_seed": [p["loss"][:n] for p in per],
                       "global_per_seed": [p["parts"].get("global", p["loss"])[:n] for p in per],
                       "parts_mean": parts})
    return {"seeds": [r["seed"] for r in runs], "stages": stages}


def plateau(data_dir: pathlib.Path, batch_size: int) -> dict:
    """The loss of a model that tells only the modality apart: ln(B / m) for m modalities in
    equal shares (ln B, chance, for one modality)."""
    recs = [r for r in read_manifest(str(data_dir)) if r.get("split") == "train"]
    m = len({r.get("modality", "") for r in recs}) or 1
    return {"modalities": m, "batch_size": batch_size, "loss": math.log(batch_size / m)}


# ---------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="real_data_eval.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    here = pathlib.Path(__file__).resolve().parents[2]
    p.add_argument("--data-root", default=os.environ.get("REGIONMED_SHARED_DATA",
                                                         str(here.parent / "shared" / "data")))
    p.add_argument("--datasets", default=",".join(DATASETS),
                   help=f"comma-separated subset of {','.join(DATASETS)}")
    p.add_argument("--out", default=str(here / "runs" / "study"))
    p.add_argument("--budget", default="small", choices=sorted(BUDGETS))
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (all stages)")
    p.add_argument("--seeds", default=",".join(map(str, FINAL_SEEDS)),
                   help="training seeds of the final comparison")
    p.add_argument("--select-seeds", default=",".join(map(str, SELECT_SEEDS)),
                   help="training seeds of the lever selection (on val)")
    p.add_argument("--levers", default=",".join(LEVERS),
                   help=f"lever groups to select, in order ({','.join(LEVERS)}), or 'none'")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--keep-models", action="store_true", help="keep each run's model folder")
    p.add_argument("--results", default=None,
                   help="where to write the results JSON (default OUT/study.json)")
    p.add_argument("--from-json", default=None, help="only render the report of a results JSON")
    p.add_argument("--readme", action="store_true", help="print the README paragraph")
    return p


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    from regionmed_fast.apps import study_report

    args = build_parser().parse_args(argv)
    if args.from_json:
        res = json.loads(pathlib.Path(args.from_json).read_text())
        if args.readme:
            print(study_report.readme_paragraph(res))
        else:
            files = study_report.write_report(res, pathlib.Path(args.from_json).parent)
            print("wrote " + ", ".join(map(str, files)))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    args.datasets = [d for d in args.datasets.split(",") if d]
    bad = [d for d in args.datasets if d not in DATASETS]
    if bad:
        build_parser().error(f"--datasets: unknown {bad}; known: {list(DATASETS)}")
    groups = [] if args.levers == "none" else [g for g in args.levers.split(",") if g]
    bad = [g for g in groups if g not in LEVERS]
    if bad:
        build_parser().error(f"--levers: unknown {bad}; known: {list(LEVERS)} or 'none'")
    budget = BUDGETS[args.budget]
    if args.steps:
        budget = dataclasses.replace(budget, steps=args.steps)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    srcs = dataset_sources(args, budget, out)
    if not srcs:
        print("study: no dataset to study", file=sys.stderr)
        return 2
    study = Study(args, budget, out, srcs)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    selection = study.select(groups, _ints(args.select_seeds)) if groups else {
        "skipped": "--levers none", "per_dataset": {
            ds: {"chosen": Setting().to_dict(), "chosen_name": Setting().name} for ds in srcs}}
    t_select = time.time() - t0
    chosen = {ds: Setting(**v["chosen"]) for ds, v in selection["per_dataset"].items()}
    final = study.final(chosen, _ints(args.seeds))
    res = {"study": {"budget_name": args.budget, "budget": budget.to_dict(), "device": device,
                     "torch": torch.__version__, "threads": torch.get_num_threads(),
                     "datasets": study.info, "seeds": _ints(args.seeds), "frozen": FROZEN,
                     "augmentation": augmentation(budget),
                     "tasks": list(TASKS), "resampling": RESAMPLING,
                     "wall_s": {"selection": t_select, "total": time.time() - t0},
                     "runs": study.n_runs},
           "selection": selection, "final": final}
    path = pathlib.Path(args.results) if args.results else out / "study.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json(res), indent=1))
    files = study_report.write_report(json.loads(path.read_text()), path.parent)
    print("\n".join(study_report.summary_lines(res)))
    print(f"wrote {path}, " + ", ".join(map(str, files)) + f"; {time.time() - t0:.0f} s")
    return 0
