#!/usr/bin/env python
"""Real-data study: RegionMed-CLIP vs the global-only baseline on the shared real datasets.

For each dataset (../shared/data/covid_chestxray, ../shared/data/ph2_dermoscopy) a validation
split is carved out of the provided images - by patient for covid (``patient_id``: no patient
in both splits), by image for PH2 (each case is a distinct lesion; stratified by clinical
diagnosis) - and both models are trained on the rest with the SAME budget (same stages, steps,
batch, image size, lr, seed; the baseline drops the region and fused losses and has no ROI
processor), starting from the shipped pretrained MiniLM text encoder, then evaluated on the
validation split with ``regionmed_fast.eval.evaluate``. Repeated over seeds; the table gives
mean +- sample standard deviation.

    python scripts/real_data_eval.py --out runs/real_data            # the full study
    python scripts/real_data_eval.py --steps 2 --seeds 0 --out /tmp/x  # a smoke run

Writes OUT/results.md (the table), OUT/results.json (every number of every run), OUT/splits.json
and per run OUT/<dataset>/<variant>-seed<k>/ (trainer output + eval report). The data is never
copied: OUT/<dataset>/data/ holds a manifest with a ``split`` field and a symlink to the images.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import pathlib
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_DATA = pathlib.Path(os.environ.get("REGIONMED_SHARED_DATA", REPO.parent / "shared" / "data"))
DATASETS = {
    # name: (group key for the split, stratify key or None)
    "covid_chestxray": ("patient_id", None),
    "ph2_dermoscopy": ("image", "clinical_diagnosis"),
}


def _h(s: str) -> str:
    return hashlib.sha1(s.encode()).hexdigest()


def carve_split(records: list[dict], group_key: str, stratify: str | None, fraction: float) -> list[str]:
    """"train"/"test" per record: whole groups go to one side; within each stratum the groups
    sorted by SHA-1 are cut so that about ``fraction`` of them are validation ("test")."""
    strata: dict[str, list[str]] = {}
    for r in records:
        g = str(r.get(group_key, r["image"]))
        s = str(r.get(stratify, "")) if stratify else ""
        strata.setdefault(s, [])
        if g not in strata[s]:
            strata[s].append(g)
    val: set[str] = set()
    for groups in strata.values():
        groups.sort(key=_h)
        val.update(groups[: max(1, round(fraction * len(groups)))])
    return ["test" if str(r.get(group_key, r["image"])) in val else "train" for r in records]


def prepare(src: pathlib.Path, dst: pathlib.Path, group_key: str, stratify: str | None,
            fraction: float) -> dict:
    """Write dst/annotations.jsonl (src's lines + ``split``) and dst/images -> src/images."""
    lines = [json.loads(l) for l in (src / "annotations.jsonl").read_text().splitlines() if l.strip()]
    splits = carve_split(lines, group_key, stratify, fraction)
    dst.mkdir(parents=True, exist_ok=True)
    with open(dst / "annotations.jsonl", "w") as f:
        for rec, sp in zip(lines, splits):
            f.write(json.dumps({**rec, "split": sp}) + "\n")
    link = dst / "images"
    if not link.exists():
        link.symlink_to(src / "images", target_is_directory=True)
    n_val = splits.count("test")
    groups = {sp: len({str(r.get(group_key, r["image"])) for r, s in zip(lines, splits) if s == sp})
              for sp in ("train", "test")}
    return {"images": len(lines), "train": len(lines) - n_val, "val": n_val,
            "train_groups": groups["train"], "val_groups": groups["test"], "group_key": group_key,
            "stratify": stratify}


def run_config(args, seed: int):
    from regionmed_fast.train.stages import RunConfig, Stage

    frozen = ["text."] if args.freeze_text else []  # the tower only, not text_proj
    st = args.steps
    stages = [
        Stage(name="global", steps=st, losses={"global": 1.0}, frozen=frozen, warmup=0.1),
        Stage(name="region", steps=st, losses={"global": 1.0, "region": 1.0}, frozen=frozen, warmup=0.1),
        Stage(name="hierarchical", steps=st, losses={"global": 1.0, "region": 1.0, "fused": 1.0},
              hard_negative_beta=0.5, frozen=frozen, warmup=0.1, lr=args.lr / 2),
    ]
    return RunConfig(stages=stages, model=args.model, image_size=args.image_size, batch_size=args.batch_size,
                     seed=seed, lr=args.lr, weight_decay=0.05, precision="fp32", save_every=10 ** 9,
                     log_every=max(1, st))


def cache_frozen_text(model) -> None:
    """Memoise the (frozen) text tower: each distinct token sequence is encoded once, in eval mode
    (no dropout), and reused; ``text_proj`` after it still trains. Parameter names and the saved
    state are unchanged (only this instance's ``forward`` is replaced). On 2 shared CPU cores the
    text tower is most of a step's time, and a frozen tower gives the same output every time."""
    import torch

    enc = model.text
    plain = enc.forward
    cache: dict[bytes, torch.Tensor] = {}

    def forward(ids, mask=None):
        if any(p.requires_grad for p in enc.parameters()):
            return plain(ids, mask)
        m = torch.ones_like(ids) if mask is None else mask
        lens = m.sum(1).tolist()
        rows = ids.cpu().numpy()
        keys = [rows[i, : int(n)].tobytes() for i, n in enumerate(lens)]
        todo, seen = [], set()
        for i, k in enumerate(keys):
            if k not in cache and k not in seen:
                seen.add(k)
                todo.append(i)
        if todo:
            was = enc.training
            enc.eval()
            with torch.no_grad():
                out = plain(ids[todo], m[todo])
            enc.train(was)
            for i, o in zip(todo, out):
                cache[keys[i]] = o
        return torch.stack([cache[k] for k in keys])

    enc.forward = forward


def train_and_eval(args, data_dir: pathlib.Path, out: pathlib.Path, variant: str, seed: int) -> dict:
    import torch

    from regionmed_fast.eval import evaluate
    from regionmed_fast.model import create_model_and_transforms, get_tokenizer
    from regionmed_fast.train.trainer import Trainer

    cfg = run_config(args, seed)
    if variant == "global-only":
        cfg = cfg.as_baseline()
    # same seed -> the towers and projections start identical in both variants (the ROI
    # processor is built after them)
    torch.manual_seed(seed)
    model = create_model_and_transforms(cfg.model, **({"use_roi": False} if variant == "global-only" else {}))[0]
    if args.freeze_text:
        cache_frozen_text(model)
    t0 = time.time()
    trainer = Trainer(cfg, str(data_dir), str(out), device=args.device, progress=False, split="train",
                      tensorboard=False, verbose=False, model=model, tokenizer=get_tokenizer(cfg.model))
    summary = trainer.fit()
    t_train = time.time() - t0
    t0 = time.time()
    res = evaluate(trainer.model, data_dir, tasks=args.tasks, report_dir=out / "eval", split="test",
                   tokenizer=trainer.tokenizer, image_size=args.image_size, batch_size=32, seed=seed)
    res["train"] = {"final_loss": summary["final_loss"], "steps": summary["global_step"],
                    "wall_s": t_train, "eval_wall_s": time.time() - t0}
    return res


# the rows of the table: metric name -> value of one run (baselines indented in parentheses)
def _metrics(res: dict) -> dict[str, float]:
    out: dict[str, float] = {}
    r = res.get("retrieval", {})
    for d, short in (("image_to_text", "I→T"), ("text_to_image", "T→I")):
        for kind, s in r.get(d, {}).items():
            for k in ("R@1", "R@5", "R@10"):
                out[f"{short} {k} ({kind})"] = s[k]
    o = res.get("oracle", {})  # rows given the annotated boxes (docs/evaluation.md)
    rt = o.get("retrieval", {}).get("region_to_text", {})
    if "R@1" in rt:
        out["region→text R@1 (oracle boxes)"] = rt["R@1"]
    zs = res.get("zeroshot", {})
    for kind, z in zs.get("by_embedding", {}).items():
        out[f"zero-shot acc ({kind})"] = z["accuracy"]
        out[f"zero-shot bal. acc ({kind})"] = z["balanced_accuracy"]
        out[f"zero-shot macro AUROC ({kind})"] = z["macro_auroc"]
    if zs.get("support"):
        out["  (zero-shot acc: majority class)"] = max(zs["support"]) / sum(zs["support"])
    g = res.get("grounding", {})
    bc = o.get("grounding", {}).get("box_choice", {})
    if "accuracy" in bc:
        out["grounding box choice (oracle boxes)"] = bc["accuracy"]
        out["  (box choice: chance)"] = bc["chance"]
    if "hit_rate" in g.get("pointing_game", {}):
        out["pointing game"] = g["pointing_game"]["hit_rate"]
        out["  (pointing: image-centre baseline)"] = g["pointing_game"]["centre_baseline"]
    v = res.get("vqa", {})
    for kind, r in v.get("by_embedding", {}).items():
        for k in ("accuracy", "closed_accuracy", "open_accuracy"):
            if r.get(k) is not None:
                out[f"VQA {k.replace('_', ' ')} ({kind})"] = r[k]
                out[f"  (VQA {k.replace('_', ' ')}: blank image, {kind})"] = \
                    r["blank_image_control"][k]
    for k in ("accuracy", "closed_accuracy", "open_accuracy"):
        if v.get("prior_baseline", {}).get(k) is not None:
            out[f"  (VQA {k.replace('_', ' ')}: question prior)"] = v["prior_baseline"][k]
    return out


def _ms(xs: list[float]) -> str:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return "-"
    m = 100 * statistics.fmean(xs)
    return f"{m:.1f} ± {100 * statistics.stdev(xs):.1f}" if len(xs) > 1 else f"{m:.1f}"


def table(all_res: dict, splits: dict, args) -> str:
    lines = ["# Real-data study: RegionMed-CLIP vs global-only baseline\n",
             f"Same budget for both: 3 stages x {args.steps} steps (global; +region; +fused with hard "
             f"negatives beta 0.5), batch {args.batch_size}, {args.image_size} px, lr {args.lr:g}, "
             f"model `{args.model}` (pretrained MiniLM text tower"
             f"{', frozen' if args.freeze_text else ''}), fp32 on {args.device or 'cpu'}; "
             f"seeds {args.seeds}; mean ± sample std over seeds, in %. Validation split carved out of "
             "the shared images (no image or patient in both).\n"]
    for ds, per in all_res.items():
        sp = splits[ds]
        lines.append(f"## {ds}\n")
        lines.append(f"train {sp['train']} images ({sp['train_groups']} {sp['group_key']}s), validation "
                     f"{sp['val']} images ({sp['val_groups']} {sp['group_key']}s)"
                     + (f", stratified by {sp['stratify']}" if sp["stratify"] else "") + ".\n")
        variants = list(per)
        rows = {}
        for v in variants:
            for res in per[v]:
                for k, x in _metrics(res).items():
                    rows.setdefault(k, {}).setdefault(v, []).append(x)
        lines.append("| metric | " + " | ".join(variants) + " |")
        lines.append("|---|" + "---|" * len(variants))
        for k, byv in rows.items():
            lines.append(f"| {k} | " + " | ".join(_ms(byv.get(v, [])) for v in variants) + " |")
        tw = {v: statistics.fmean(r["train"]["wall_s"] for r in per[v]) for v in variants}
        lines.append("\nTraining wall time per run (s, noisy shared CPU): "
                     + ", ".join(f"{v} {t:.0f}" for v, t in tw.items()) + ".\n")
        first = per[variants[0]][0]
        zs = first.get("zeroshot", {})
        if "classes" in zs:
            lines.append(f"Zero-shot classes: {', '.join(zs['classes'])} (support {zs['support']}); "
                         f"prompt family `{zs['prompt_family']}`.")
        if "vqa" in first:
            lines.append(f"VQA QA source: {first['vqa'].get('qa_source')}.\n")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=str(DEFAULT_DATA))
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--out", default=str(REPO / "runs" / "real_data"))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=15, help="optimizer steps per stage (3 stages)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--model", default="regionmed-tiny")
    p.add_argument("--freeze-text", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the pretrained MiniLM text tower fixed (default: yes; CPU budget)")
    p.add_argument("--val-fraction", type=float, default=0.3)
    p.add_argument("--tasks", default="retrieval,zeroshot,grounding,vqa")
    p.add_argument("--device", default=None)
    p.add_argument("--from-json", default=None,
                   help="only rebuild results.md from an earlier run's results.json")
    args = p.parse_args(argv)
    if args.from_json:
        blob = json.loads(pathlib.Path(args.from_json).read_text())
        for k, v in blob["args"].items():
            if k != "from_json":
                setattr(args, k, v)
        md = pathlib.Path(args.from_json).with_name("results.md")
        md.write_text(table(blob["runs"], blob["splits"], args))
        print(f"wrote {md}")
        return 0
    args.seeds = [int(s) for s in args.seeds.split(",")]
    root, out = pathlib.Path(args.data_root), pathlib.Path(args.out)
    names = [d for d in args.datasets.split(",") if d]
    for d in names:
        if d not in DATASETS:
            p.error(f"unknown dataset {d!r}; known: {sorted(DATASETS)}")
        if not (root / d / "annotations.jsonl").is_file():
            print(f"real_data_eval: {root / d} has no annotations.jsonl (set --data-root)", file=sys.stderr)
            return 2
    out.mkdir(parents=True, exist_ok=True)
    splits, all_res = {}, {}
    for d in names:
        gk, strat = DATASETS[d]
        data_dir = out / d / "data"
        splits[d] = prepare(root / d, data_dir, gk, strat, args.val_fraction)
        print(f"{d}: {splits[d]}", flush=True)
        all_res[d] = {"RegionMed-CLIP": [], "global-only": []}
        for seed in args.seeds:
            for variant in ("RegionMed-CLIP", "global-only"):
                t0 = time.time()
                res = train_and_eval(args, data_dir, out / d / f"{variant}-seed{seed}", variant, seed)
                all_res[d][variant].append(res)
                m = _metrics(res)
                key = [k for k in m if k.startswith("I→T R@1")]
                print(f"  {d} {variant} seed {seed}: {time.time() - t0:.0f} s, "
                      + ", ".join(f"{k} {100 * m[k]:.1f}" for k in key), flush=True)
        # rewrite after every dataset so a cut-short study still leaves its table
        from regionmed_fast.eval.report import clean as _clean

        (out / "results.json").write_text(json.dumps(_clean({"args": vars(args), "splits": splits,
                                                             "runs": all_res}), indent=1))
        (out / "splits.json").write_text(json.dumps(splits, indent=1))
        (out / "results.md").write_text(table(all_res, splits, args))
    print(f"wrote {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
