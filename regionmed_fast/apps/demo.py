"""``regionmed-fast demo``: the paper's claim in miniature, on a fresh install, in minutes on a CPU.

1. writes the synthetic phantom dataset (``regionmed_fast.data.synthetic``), train/test split;
2. trains the tiny RegionMed-CLIP progressively (global -> region -> hierarchical stages) and
   the global-only baseline (no RoI processor, global loss only) with the same budget (same
   steps, batch, image size, learning rates);
3. evaluates both on the held-out split with no annotation at test time: the global embedding
   of each model, and the region-trained model's region-aware embedding with its own proposed
   boxes (``encode_image(images, boxes="auto")``); image->text / text->image recall and
   zero-shot accuracy overall and by lesion size. The annotated boxes are an oracle: those rows
   are printed apart, over the images that have findings only. Every difference is printed with
   its 95 % bootstrap interval over the test images; from one training seed none is a finding
   ("cannot be told apart (one seed)"). Writes a report folder (``report.md``, ``results.json``,
   PNG plots when matplotlib is installed).

Zero-shot here: each test image is classified among its modality's classes (finding kinds and
"normal") with the dataset's class prompts; a prediction is right when it is one of the image's
labels. Images are grouped by their LARGEST finding, so the "small" group holds the images whose
every finding is small: the model must see a small lesion to be right. Nothing is tuned on the
test split; the stage file is fixed before the run.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import shutil
import textwrap
import time

import torch
from PIL import Image

from regionmed_fast.data.manifest import read_manifest
from regionmed_fast.data.split import select_split
from regionmed_fast.data.synthetic import KINDS, NORMAL, class_prompt, write_dataset
from regionmed_fast.eval.embed import GLOBAL, ORACLE, PROPOSED, EvalSet, embed_split, encode_texts
from regionmed_fast.eval.metrics import (bootstrap_indices, dedup_texts, mean_difference,
                                         retrieval_ranks)
from regionmed_fast.eval.report import figures_available
from regionmed_fast.eval.retrieval import evaluate_retrieval
from regionmed_fast.model import model_config
from regionmed_fast.model.text import check_text_tower
from regionmed_fast.train.stages import builtin_config, load_run
from regionmed_fast.train.trainer import Trainer, build_model

SIZE_GROUPS = ("small", "medium", "large", "normal")
REGION, BASELINE = "region-aware", "global-only"
ROW_LABELS = {GLOBAL: "global embedding", PROPOSED: "proposed boxes", ORACLE: "oracle boxes"}
ONE_SEED = "one seed: cannot be told apart"


def _say(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------- evaluation
def size_group(rec: dict) -> str:
    """The size class of the image's largest finding, or ``normal``."""
    regs = rec.get("regions", [])
    if not regs:
        return "normal"
    order = {"small": 0, "medium": 1, "large": 2}
    return max((r.get("size_class", "large") for r in regs), key=order.__getitem__)


def zero_shot_by_size(es: EvalSet, model, tokenizer, rows: dict[str, torch.Tensor]) -> dict:
    """Per row: accuracy overall and per size group, per-image correctness, predictions."""
    prompts = {}
    for modality, kinds in KINDS.items():
        classes = list(kinds) + [NORMAL]
        prompts[modality] = (classes, encode_texts(model, tokenizer,
                                                   [class_prompt(c, modality) for c in classes]))
    groups = [size_group(r) for r in es.records]
    out = {}
    for row, emb in rows.items():
        correct, preds = [], []
        for i, rec in enumerate(es.records):
            classes, cemb = prompts[rec.get("modality", "chest_xray")]
            pred = classes[int((emb[i] @ cemb.T).argmax())]
            preds.append(pred)
            correct.append(pred in set(rec.get("labels", [])))
        acc = {"overall": sum(correct) / len(correct)}
        counts = {}
        for g in SIZE_GROUPS:
            idx = [i for i, gg in enumerate(groups) if gg == g]
            counts[g] = len(idx)
            acc[g] = sum(correct[i] for i in idx) / len(idx) if idx else float("nan")
        small = [preds[i] for i, g in enumerate(groups) if g == "small"]
        top = max(sorted(set(small)), key=small.count) if small else None
        out[row] = {"accuracy": acc, "counts": counts, "correct": correct, "groups": groups,
                    "small_top_prediction": [top, small.count(top) / len(small) if small else 0.0]}
    return out


def image_to_text_hits(es: EvalSet, model, tokenizer, rows: dict[str, torch.Tensor], k: int = 10
                       ) -> dict[str, torch.Tensor]:
    """Per row, per test image: 1.0 when its own text ranks in the top ``k`` (for paired
    intervals of recall differences)."""
    uniq, tid = dedup_texts(es.texts)
    temb = encode_texts(model, tokenizer, uniq)
    return {row: (retrieval_ranks(emb, temb, tid, torch.arange(len(uniq))) <= k).double()
            for row, emb in rows.items()}


def evaluate_model(model, tokenizer, records: list[dict], image_size: int) -> tuple[dict, EvalSet]:
    """Headline rows on every test image, oracle rows on the images with findings."""
    es = embed_split(model, records, image_size, batch_size=64)
    rows = es.rows()
    res = {"retrieval": evaluate_retrieval(es, model, tokenizer, rows),
           "zeroshot": zero_shot_by_size(es, model, tokenizer, rows),
           "hits@10": image_to_text_hits(es, model, tokenizer, rows)}
    if es.oracle is not None:
        idx = [i for i, has in enumerate(es.has_boxes) if has]
        sub = es.subset(idx)
        orows = sub.rows(oracle=True)
        res["oracle"] = {"n_images": len(idx),
                         "retrieval": evaluate_retrieval(sub, model, tokenizer, orows),
                         "zeroshot": zero_shot_by_size(sub, model, tokenizer, orows)}
    return res, es


def differences(results: dict, n_boot: int = 1000, seed: int = 0) -> list[dict]:
    """Each headline row of the region-trained model minus the baseline's global row, paired
    over the same test images, with a 95 % bootstrap interval; the verdict is always
    :data:`ONE_SEED`: one training seed cannot separate a method from run-to-run spread."""
    reg, base = results.get(REGION), results.get(BASELINE)
    if reg is None or base is None:
        return []
    b = base["zeroshot"][GLOBAL]
    groups = b["groups"]
    out = []
    for row in reg["zeroshot"]:
        r = reg["zeroshot"][row]
        for g in ("overall", "small", "medium", "large"):
            keep = [i for i, gg in enumerate(groups) if g == "overall" or gg == g]
            if not keep:
                continue
            a = torch.tensor([float(r["correct"][i]) for i in keep])
            c = torch.tensor([float(b["correct"][i]) for i in keep])
            d = mean_difference(a, c, bootstrap_indices(len(keep), n_boot, seed))
            out.append({"metric": f"zero-shot accuracy, {g}", "a": f"{REGION}: {ROW_LABELS[row]}",
                        "b": f"{BASELINE}: {ROW_LABELS[GLOBAL]}", "n": len(keep), **d,
                        "verdict": ONE_SEED})
        hits = reg["hits@10"][row]
        d = mean_difference(hits, base["hits@10"][GLOBAL], bootstrap_indices(len(hits), n_boot, seed))
        out.append({"metric": "image-to-text R@10", "a": f"{REGION}: {ROW_LABELS[row]}",
                    "b": f"{BASELINE}: {ROW_LABELS[GLOBAL]}", "n": len(hits), **d,
                    "verdict": ONE_SEED})
    return out


def format_difference(d: dict) -> str:
    lo, hi = d["ci95"]
    return (f"{d['metric']}: {d['a']} - {d['b']} = {100 * d['diff']:+.1f} points "
            f"(95 % interval over {d['n']} test images {100 * lo:+.1f} to {100 * hi:+.1f}); "
            f"{d['verdict']}")


# ---------------------------------------------------------------- report
def _rows(results: dict, oracle: bool = False) -> list[tuple[str, dict]]:
    """(row label, numbers) for every (model, embedding) pair."""
    rows = []
    for model_name, res in results.items():
        src = res.get("oracle") if oracle else res
        if src is None:
            continue
        for row in src["retrieval"]["image_to_text"]:
            i2t, t2i = src["retrieval"]["image_to_text"][row], src["retrieval"]["text_to_image"][row]
            acc = src["zeroshot"][row]["accuracy"]
            rows.append((f"{model_name}: {ROW_LABELS[row]}", {
                "i2t R@1": i2t["R@1"], "i2t R@5": i2t["R@5"], "i2t R@10": i2t["R@10"],
                "t2i R@10": t2i["R@10"], "zs acc": acc["overall"], "zs small": acc["small"],
                "zs medium": acc["medium"], "zs large": acc["large"]}))
    return rows


def format_table(results: dict, markdown: bool = False, oracle: bool = False) -> str:
    rows = _rows(results, oracle)
    if not rows:
        return ""
    cols = list(rows[0][1])

    def cell(v):
        return "-" if v != v else f"{100 * v:.1f}"
    if markdown:
        lines = ["| model: embedding | " + " | ".join(cols) + " |",
                 "| --- |" + " ---: |" * len(cols)]
        lines += [f"| {name} | " + " | ".join(cell(v) for v in vals.values()) + " |"
                  for name, vals in rows]
        return "\n".join(lines)
    w = max(len(n) for n, _ in rows)
    lines = [f"{'model: embedding':<{w}}  " + " ".join(f"{c:>9}" for c in cols)]
    lines += [f"{name:<{w}}  " + " ".join(f"{cell(v):>9}" for v in vals.values())
              for name, vals in rows]
    return "\n".join(lines)


ORACLE_TITLE = ("Oracle boxes (the test images' annotated boxes given to the model; only the "
                "images with findings; not comparable to the rows above)")


def _plots(report: str, histories: dict, results: dict, sets: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, axes = plt.subplots(1, len(histories), figsize=(6 * len(histories), 4), squeeze=False)
    for ax, (name, hist) in zip(axes[0], histories.items()):
        steps = [h["global_step"] for h in hist]
        keys = sorted({k for h in hist for k in h if k.startswith("loss_")})
        ax.plot(steps, [h["loss"] for h in hist], color="black", label="total")
        for k in keys:
            pts = [(h["global_step"], h[k]) for h in hist if k in h]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k[5:], alpha=0.8)
        last = None
        for h in hist:
            if h["stage"] != last:
                ax.axvline(h["global_step"] - 1, color="grey", ls=":", lw=1)
                ax.text(h["global_step"], ax.get_ylim()[1], h["stage"], fontsize=7, va="top")
                last = h["stage"]
        ax.set_title(f"{name}: training loss by stage")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    files.append(os.path.join(report, "loss_curves.png"))
    fig.savefig(files[-1], dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 4))
    rows = [(m, k, res["zeroshot"][k]) for m, res in results.items() for k in res["zeroshot"]]
    width = 0.8 / max(len(rows), 1)
    for j, (m, k, z) in enumerate(rows):
        xs = [i + j * width for i in range(len(SIZE_GROUPS))]
        ax.bar(xs, [100 * z["accuracy"][g] for g in SIZE_GROUPS], width, label=f"{m}: {ROW_LABELS[k]}")
    counts = rows[0][2]["counts"]
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(SIZE_GROUPS))])
    ax.set_xticklabels([f"{g}\n(n={counts[g]})" for g in SIZE_GROUPS])
    ax.set_ylabel("zero-shot accuracy (%)")
    ax.set_title("zero-shot accuracy by the size of the image's largest finding (test split, one seed)")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    files.append(os.path.join(report, "accuracy_by_lesion_size.png"))
    fig.savefig(files[-1], dpi=100)
    plt.close(fig)
    files.append(_examples(report, results, sets, plt))
    return files


def _examples(report: str, results: dict, sets: dict, plt, n: int = 4) -> str:
    names = list(results)
    es0 = sets[REGION] if REGION in sets else sets[names[0]]
    # prefer images whose findings are all small: where the two models should differ
    small = [i for i, r in enumerate(es0.records) if size_group(r) == "small"]
    picks = (small + [i for i in range(es0.n_images) if i not in small])[:n]
    fig, axes = plt.subplots(len(picks), 1 + len(names),
                             figsize=(4.2 * (1 + len(names)), 3.2 * len(picks)), squeeze=False)
    for row, i in enumerate(picks):
        rec = es0.records[i]
        ax = axes[row][0]
        with Image.open(rec["image_path"]) as im:
            ax.imshow(im.convert("RGB"))
        for g in rec.get("regions", []):
            x1, y1, x2, y2 = g["bbox"]
            ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color="lime", lw=1))
        if es0.proposed is not None:  # proposed boxes are in model-input pixels: scale back
            sx, sy = rec["width"] / es0.image_size, rec["height"] / es0.image_size
            for x1, y1, x2, y2 in es0.proposed.boxes[i].tolist():
                ax.add_patch(plt.Rectangle((x1 * sx, y1 * sy), (x2 - x1) * sx, (y2 - y1) * sy,
                                           fill=False, color="cyan", lw=1, ls="--"))
        ax.set_title("\n".join(textwrap.wrap("truth: " + rec["text"], 48)), fontsize=6)
        ax.axis("off")
        for col, name in enumerate(names, 1):
            ret = results[name]["retrieval"]
            top = ret["top_texts"]["indices"][i]
            uniq = ret["unique_texts"]
            lines = [f"[{ROW_LABELS[ret['top_texts']['embedding']]}]"]
            for r, t in enumerate(top):
                mark = "+" if t == ret["top_texts"]["target"][i] else "-"
                lines.append(f"{r + 1}{mark} " + textwrap.shorten(uniq[t], 110))
            ax = axes[row][col]
            ax.text(0, 1, "\n".join("\n   ".join(textwrap.wrap(ln, 50)) for ln in lines),
                    va="top", fontsize=6, family="monospace", transform=ax.transAxes)
            ax.set_title(name, fontsize=8)
            ax.axis("off")
    fig.suptitle("green: annotated boxes (not given to the models); cyan dashed: the region-aware "
                 "model's proposed boxes", fontsize=8)
    fig.tight_layout()
    path = os.path.join(report, "examples.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _slim(res: dict) -> dict:
    out = {"retrieval": {k: v for k, v in res["retrieval"].items()
                         if k in ("image_to_text", "text_to_image", "differences", "n_images",
                                  "n_unique_texts")},
           "zeroshot": {k: {kk: vv for kk, vv in z.items() if kk not in ("correct", "groups")}
                        for k, z in res["zeroshot"].items()}}
    if "oracle" in res:
        out["oracle"] = {"n_images": res["oracle"]["n_images"], **_slim(
            {"retrieval": res["oracle"]["retrieval"], "zeroshot": res["oracle"]["zeroshot"]})}
    return out


def write_report(report: str, args, cfg, results: dict, diffs: list[dict], histories: dict,
                 timings: dict, sets: dict, n_train: int, n_test: int) -> list[str]:
    os.makedirs(report, exist_ok=True)
    if figures_available():
        files = _plots(report, histories, results, sets)
        figure_note = []
    else:
        files = []
        figure_note = ["Figures skipped: matplotlib is not installed "
                       "(pip install 'regionmed-fast[report]')."]
        _say("[demo] figures skipped: matplotlib is not installed (pip install 'regionmed-fast[report]')")
    with open(os.path.join(report, "results.json"), "w") as fh:
        json.dump({"results": {m: _slim(r) for m, r in results.items()}, "differences": diffs,
                   "timings_s": timings, "config": cfg.to_dict(), "n_train": n_train,
                   "n_test": n_test}, fh, indent=2, default=str)
    stages = "\n".join(f"| {s.name} | {s.steps or s.epochs} {'steps' if s.steps else 'epochs'} | "
                       f"{s.losses} | {s.hard_negative_beta} | {s.lr or cfg.lr} |" for s in cfg.stages)
    md = [
        "# regionmed-fast demo: region-aware vs global-only on synthetic phantoms", "",
        f"Data: {n_train} training and {n_test} held-out test phantoms ({args.size} px stored, "
        f"{cfg.image_size} px to the model), seed {args.seed}. Model `{cfg.model}`; global batch "
        f"{cfg.batch_size}; both models get the same steps, batch, image size and learning rates.",
        "", "| stage | length | losses (region-aware run) | hard_negative_beta | lr |",
        "| --- | --- | --- | --- | --- |", stages, "",
        "The global-only baseline runs the same stages with the global loss only and no RoI processor.",
        "", "## Results on the held-out split (%), no annotation at test time", "",
        format_table(results, markdown=True), "",
        "i2t / t2i: image-to-text / text-to-image recall (texts deduplicated). zs: zero-shot "
        "accuracy among the modality's classes; small / medium / large: images grouped by their "
        "largest finding (so 'small' = every finding in the image is small). Proposed boxes: the "
        "region-aware embedding with the model's own boxes (`encode_image(images, boxes=\"auto\")`).",
        "", "## Differences", "",
        "One training seed: the spread over seeds is not measured, so no difference below is a "
        "finding. The intervals are 95 % paired bootstrap intervals over the test images.", "",
        *[f"* {format_difference(d)}" for d in diffs], "",
        f"## {ORACLE_TITLE}", "", format_table(results, markdown=True, oracle=True), "",
        "## Timings (s)", "", *[f"* {k}: {v:.1f}" for k, v in timings.items()], "",
        "## Figures", "", *figure_note,
        *[f"![{os.path.basename(f)}]({os.path.basename(f)})" for f in files], "",
    ]
    with open(os.path.join(report, "report.md"), "w") as fh:
        fh.write("\n".join(md))
    return [os.path.join(report, "report.md"), os.path.join(report, "results.json"), *files]


# ---------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="regionmed-fast demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="regionmed-demo", help="folder for data, runs and report")
    p.add_argument("--config", default="demo", help="stage file or shipped name (default demo)")
    p.add_argument("--n", type=int, default=1600, help="synthetic images (train + test)")
    p.add_argument("--size", type=int, default=128, help="stored image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps-scale", type=float, default=1.0,
                   help="multiply every stage's steps (e.g. 0.1 for a smoke run)")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")
    return p


def cli_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    t_all = time.time()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_run(args.config if os.path.exists(args.config) else builtin_config(args.config))
    # before any work: the text tower can be built here, or one line says what to install
    check_text_tower(model_config(cfg.model, **cfg.model_args).text.name)
    if args.steps_scale != 1.0:
        cfg = dataclasses.replace(cfg, stages=[dataclasses.replace(
            s, steps=max(1, round(s.steps * args.steps_scale)) if s.steps else None,
            epochs=s.epochs * args.steps_scale if s.epochs else None) for s in cfg.stages])
    cfg = dataclasses.replace(cfg, seed=args.seed)
    data = os.path.join(args.out, "data")
    report = os.path.join(args.out, "report")
    timings: dict[str, float] = {}

    _say(f"[demo] 1/4 writing {args.n} synthetic phantoms ({args.size} px) to {data}")
    t = time.time()
    if os.path.isdir(data):
        shutil.rmtree(data)
    write_dataset(data, n=args.n, size=args.size, seed=args.seed)
    timings["synthetic data"] = time.time() - t
    records = read_manifest(data)
    test = select_split(records, "test")
    n_train, n_test = len(select_split(records, "train")), len(test)
    _say(f"[demo]     {n_train} train / {n_test} test images in {timings['synthetic data']:.1f} s")

    results, histories, sets = {}, {}, {}
    tensorboard = importlib.util.find_spec("tensorboard") is not None
    for k, (name, run_cfg) in enumerate(((REGION, cfg), (BASELINE, cfg.as_baseline()))):
        _say(f"[demo] {2 + k}/4 training {name} {run_cfg.model}: "
             + ", ".join(f"{s.name} {s.steps or s.epochs} {'steps' if s.steps else 'epochs'} "
                         f"{sorted(s.losses)}" for s in run_cfg.stages))
        t = time.time()
        torch.manual_seed(run_cfg.seed)
        model, tokenizer = build_model(run_cfg)
        out = os.path.join(args.out, "runs", name)
        if os.path.isdir(out):
            shutil.rmtree(out)
        trainer = Trainer(run_cfg, data, out, model=model, tokenizer=tokenizer, device=args.device,
                          progress=not args.no_progress, tensorboard=tensorboard)
        summary = trainer.fit()
        trainer.close()
        timings[f"train {name}"] = time.time() - t
        histories[name] = summary["history"]
        _say(f"[demo]     {name}: {summary['global_step']} steps in {timings[f'train {name}']:.1f} s, "
             f"final loss {summary['final_loss']:.3f}; evaluating on the test split")
        t = time.time()
        size = trainer.model.config.trained_image_size or run_cfg.stages[-1].image_size \
            or run_cfg.image_size
        results[name], sets[name] = evaluate_model(trainer.model, tokenizer, test, size)
        timings[f"eval {name}"] = time.time() - t
    diffs = differences(results)
    _say("[demo] 4/4 results on the held-out split (%), no annotation at test time:\n")
    _say(format_table(results))
    _say("\n[demo] differences (one training seed: the spread over seeds is not measured, so none "
         "is a finding; 95 % intervals over the test images):")
    for d in diffs:
        _say("  * " + format_difference(d))
    oracle = format_table(results, oracle=True)
    if oracle:
        _say(f"\n[demo] {ORACLE_TITLE}:\n")
        _say(oracle)
    timings["total"] = time.time() - t_all
    files = write_report(report, args, cfg, results, diffs, histories, timings, sets, n_train,
                         n_test)
    _say(f"\n[demo] report: {files[0]} (+ {len(files) - 1} files); total {timings['total']:.0f} s")
    return 0
