"""``regionmed-fast demo``: the paper's claim in miniature, on a fresh install, in minutes on a CPU.

1. writes the synthetic phantom dataset (``regionmed_fast.data.synthetic``), train/test split;
2. trains the tiny RegionMed-CLIP progressively (global -> region -> hierarchical stages) and
   the global-only baseline (no ROI processor, global loss only) with the same budget (same
   steps, batch, image size, learning rates);
3. evaluates both on the held-out split: image->text and text->image R@1/5/10 and zero-shot
   accuracy overall and by lesion size; prints a table and writes a report folder
   (``report.md``, ``results.json``, PNG plots: loss curves per stage, accuracy by lesion size,
   test images with their boxes and retrieved texts).

Zero-shot here: each test image is classified among its modality's classes (finding kinds and
"normal") with the dataset's class prompts; a prediction is right when it is one of the image's
labels. Images are grouped by their LARGEST finding, so the "small" group holds the images whose
every finding is small: the model must see a small lesion to be right. Nothing is tuned on the
test split; the stage file is fixed before the run.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import torch

SIZE_GROUPS = ("small", "medium", "large", "normal")


def _say(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------- evaluation
def zero_shot_by_size(es, model, tokenizer) -> dict:
    """Per embedding kind: accuracy overall and per size group, plus per-image correctness."""
    from regionmed_fast.data.synthetic import KINDS, NORMAL, class_prompt
    from regionmed_fast.eval.embed import encode_texts
    from regionmed_fast.eval.retrieval import image_embeddings

    prompts: dict[str, tuple[list[str], torch.Tensor]] = {}
    for modality, kinds in KINDS.items():
        classes = list(kinds) + [NORMAL]
        emb = encode_texts(model, tokenizer, [class_prompt(c, modality) for c in classes])
        prompts[modality] = (classes, emb)
    groups = []
    for rec in es.records:
        regs = rec.get("regions", [])
        if not regs:
            groups.append("normal")
            continue
        order = {"small": 0, "medium": 1, "large": 2}
        groups.append(max((r.get("size_class", "large") for r in regs), key=order.__getitem__))
    out = {}
    for kind, emb in image_embeddings(es).items():
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
        top = max(set(small), key=small.count) if small else None
        out[kind] = {"accuracy": acc, "counts": counts, "correct": correct,
                     "small_top_prediction": [top, small.count(top) / len(small) if small else 0.0]}
    return out


def evaluate_model(model, tokenizer, data_dir: str, image_size: int) -> tuple[dict, object]:
    from regionmed_fast.eval.embed import embed_split, read_records, split_records
    from regionmed_fast.eval.retrieval import evaluate_retrieval

    recs = split_records(read_records(data_dir), "test")
    es = embed_split(model, recs, tokenizer, image_size, batch_size=64)
    ret = evaluate_retrieval(es, model, tokenizer)
    zs = zero_shot_by_size(es, model, tokenizer)
    return {"retrieval": ret, "zeroshot": zs}, es


# ---------------------------------------------------------------- report
def _rows(results: dict) -> list[tuple[str, dict]]:
    """(row label, numbers) for every (model, embedding) pair."""
    rows = []
    for model_name, res in results.items():
        for kind in res["retrieval"]["image_to_text"]:
            i2t, t2i = res["retrieval"]["image_to_text"][kind], res["retrieval"]["text_to_image"][kind]
            acc = res["zeroshot"][kind]["accuracy"]
            label = {"global": "global embedding", "region_aware": "region-aware (test boxes)"}[kind]
            rows.append((f"{model_name}: {label}", {
                "i2t R@1": i2t["R@1"], "i2t R@5": i2t["R@5"], "i2t R@10": i2t["R@10"],
                "t2i R@1": t2i["R@1"], "t2i R@5": t2i["R@5"], "t2i R@10": t2i["R@10"],
                "zs acc": acc["overall"], "zs small": acc["small"], "zs medium": acc["medium"],
                "zs large": acc["large"]}))
    return rows


def format_table(results: dict, markdown: bool = False) -> str:
    rows = _rows(results)
    cols = list(rows[0][1])
    if markdown:
        lines = ["| model | " + " | ".join(cols) + " |", "| --- |" + " ---: |" * len(cols)]
        lines += [f"| {name} | " + " | ".join(f"{100 * v:.1f}" for v in vals.values()) + " |"
                  for name, vals in rows]
        return "\n".join(lines)
    w = max(len(n) for n, _ in rows)
    lines = [f"{'model':<{w}}  " + " ".join(f"{c:>9}" for c in cols)]
    lines += [f"{name:<{w}}  " + " ".join(f"{100 * v:9.1f}" for v in vals.values()) for name, vals in rows]
    return "\n".join(lines)


def _plots(report: str, histories: dict, results: dict, sets: dict, models: dict, tokenizer) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    files = []
    # loss curves per stage
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
    # accuracy by lesion size
    fig, ax = plt.subplots(figsize=(8, 4))
    rows = [(m, k, res["zeroshot"][k]) for m, res in results.items() for k in res["zeroshot"]]
    width = 0.8 / max(len(rows), 1)
    for j, (m, k, z) in enumerate(rows):
        xs = [i + j * width for i in range(len(SIZE_GROUPS))]
        ax.bar(xs, [100 * z["accuracy"][g] for g in SIZE_GROUPS], width, label=f"{m} ({k})")
    counts = rows[0][2]["counts"]
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(SIZE_GROUPS))])
    ax.set_xticklabels([f"{g}\n(n={counts[g]})" for g in SIZE_GROUPS])
    ax.set_ylabel("zero-shot accuracy (%)")
    ax.set_title("zero-shot accuracy by the size of the image's largest finding (test split)")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    files.append(os.path.join(report, "accuracy_by_lesion_size.png"))
    fig.savefig(files[-1], dpi=100)
    plt.close(fig)
    # a few test images, boxes, and the top texts each model retrieves
    files += _examples(report, results, sets, plt)
    return files


def _examples(report: str, results: dict, sets: dict, plt, n: int = 4) -> list[str]:
    import textwrap

    from PIL import Image

    names = list(results)
    es0 = sets[names[0]]
    # prefer images whose findings are all small: where the two models should differ
    small = [i for i, r in enumerate(es0.records)
             if r.get("regions") and all(g.get("size_class") == "small" for g in r["regions"])]
    picks = (small + [i for i in range(es0.n_images) if i not in small])[:n]
    fig, axes = plt.subplots(len(picks), 1 + len(names), figsize=(4.2 * (1 + len(names)), 3.2 * len(picks)),
                             squeeze=False)
    for row, i in enumerate(picks):
        rec = es0.records[i]
        with Image.open(os.path.join(rec["_root"], rec["image"])) as im:
            ax = axes[row][0]
            ax.imshow(im.convert("RGB"))
        for g in rec.get("regions", []):
            x1, y1, x2, y2 = g["bbox"]
            ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color="lime", lw=1))
        ax.set_title("\n".join(textwrap.wrap("truth: " + rec["text"], 48)), fontsize=6)
        ax.axis("off")
        for col, name in enumerate(names, 1):
            ret = results[name]["retrieval"]
            top = ret["top_texts"]["indices"][i]
            uniq = ret["unique_texts"]
            lines = [f"[{results[name]['retrieval']['top_texts']['embedding']}]"]
            for r, t in enumerate(top):
                mark = "+" if t == ret["top_texts"]["target"][i] else "-"
                lines.append(f"{r + 1}{mark} " + textwrap.shorten(uniq[t], 110))
            ax = axes[row][col]
            ax.text(0, 1, "\n".join("\n   ".join(textwrap.wrap(ln, 50)) for ln in lines),
                    va="top", fontsize=6, family="monospace", transform=ax.transAxes)
            ax.set_title(name, fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    path = os.path.join(report, "examples.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def _findings(results: dict) -> list[str]:
    """Plain statements computed from the numbers (no cherry-picking: every row is in the table)."""
    reg, base = results.get("region-aware"), results.get("global-only")
    if reg is None or base is None:
        return []
    b = base["zeroshot"]["global"]["accuracy"]
    out = []
    for kind, label in (("global", "its global embedding"), ("region_aware", "its region-aware embedding (test boxes)")):
        if kind not in reg["zeroshot"]:
            continue
        r = reg["zeroshot"][kind]["accuracy"]
        d_small, d_all = 100 * (r["small"] - b["small"]), 100 * (r["overall"] - b["overall"])
        verdict = "beats" if d_small > 0 else "does not beat"
        out.append(f"Region-aware training, scored with {label}, {verdict} the global-only baseline "
                   f"on small lesions: {100 * r['small']:.1f}% vs {100 * b['small']:.1f}% "
                   f"({d_small:+.1f} points; overall {d_all:+.1f} points).")
        if kind == "region_aware":
            out.append("The region-aware embedding is given the test images' ground-truth boxes, "
                       "information the baseline never gets; the fair comparison is the row above.")
        ri = reg["retrieval"]["image_to_text"][kind]["R@1"]
        bi = base["retrieval"]["image_to_text"]["global"]["R@1"]
        out.append(f"Image-to-text R@1 with {label}: {100 * ri:.1f}% vs {100 * bi:.1f}% for the baseline.")
    top, share = base["zeroshot"]["global"].get("small_top_prediction", [None, 0.0])
    if top is not None:
        out.append(f"On the small-lesion images the global-only baseline answers {top!r} "
                   f"{100 * share:.0f}% of the time.")
    return out


def write_report(report: str, args, cfg, results: dict, histories: dict, timings: dict,
                 sets: dict, models: dict, tokenizer, n_train: int, n_test: int) -> list[str]:
    os.makedirs(report, exist_ok=True)
    files = _plots(report, histories, results, sets, models, tokenizer)
    slim = {m: {"retrieval": {k: v for k, v in r["retrieval"].items()
                              if k in ("image_to_text", "text_to_image", "region_to_text", "n_images",
                                       "n_unique_texts")},
                "zeroshot": {k: {kk: vv for kk, vv in z.items() if kk != "correct"}
                             for k, z in r["zeroshot"].items()}}
            for m, r in results.items()}
    with open(os.path.join(report, "results.json"), "w") as fh:
        json.dump({"results": slim, "timings_s": timings, "config": cfg.to_dict(),
                   "n_train": n_train, "n_test": n_test}, fh, indent=2, default=str)
    stages = "\n".join(f"| {s.name} | {s.steps or s.epochs} {'steps' if s.steps else 'epochs'} | "
                       f"{s.losses} | {s.hard_negative_beta} | {s.lr or cfg.lr} |" for s in cfg.stages)
    md = [
        "# regionmed-fast demo: region-aware vs global-only on synthetic phantoms", "",
        f"Data: {n_train} training and {n_test} held-out test phantoms ({args.size} px stored, "
        f"{cfg.image_size} px to the model), seed {args.seed}. Model `{cfg.model}`; global batch "
        f"{cfg.batch_size}; both models get the same steps, batch, image size and learning rates.",
        "", "| stage | length | losses (region-aware run) | hard_negative_beta | lr |",
        "| --- | --- | --- | --- | --- |", stages, "",
        "The global-only baseline runs the same stages with the global loss only and no ROI processor.",
        "", "## Results on the held-out split (%)", "", format_table(results, markdown=True), "",
        "i2t / t2i: image-to-text / text-to-image recall (texts deduplicated). zs: zero-shot "
        "accuracy among the modality's classes; small / medium / large: images grouped by their "
        "largest finding (so 'small' = every finding in the image is small).", "",
        "## What the numbers say", "", *[f"* {s}" for s in _findings(results)], "",
        "## Timings (s)", "", *[f"* {k}: {v:.1f}" for k, v in timings.items()], "",
        "## Figures", "", *[f"![{os.path.basename(f)}]({os.path.basename(f)})" for f in files], "",
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
    import dataclasses

    args = build_parser().parse_args(argv)
    t_all = time.time()
    if args.threads:
        torch.set_num_threads(args.threads)
    from regionmed_fast.data.synthetic import write_dataset
    from regionmed_fast.train.stages import builtin_config, load_run
    from regionmed_fast.train.trainer import Trainer, build_model

    cfg = load_run(args.config if os.path.exists(args.config) else builtin_config(args.config))
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
    from regionmed_fast.train.data import read_records

    n_train, n_test = len(read_records(data, "train")), len(read_records(data, "test"))
    _say(f"[demo]     {n_train} train / {n_test} test images in {timings['synthetic data']:.1f} s")

    results, histories, sets, models = {}, {}, {}, {}
    tokenizer = None
    runs = (("region-aware", cfg), ("global-only", cfg.as_baseline()))
    for k, (name, run_cfg) in enumerate(runs):
        _say(f"[demo] {2 + k}/4 training {name} {run_cfg.model}: "
             + ", ".join(f"{s.name} {s.steps or s.epochs} {'steps' if s.steps else 'epochs'} {sorted(s.losses)}"
                         for s in run_cfg.stages))
        t = time.time()
        torch.manual_seed(run_cfg.seed)
        model, tokenizer = build_model(run_cfg)
        out = os.path.join(args.out, "runs", name)
        if os.path.isdir(out):
            shutil.rmtree(out)
        trainer = Trainer(run_cfg, data, out, model=model, tokenizer=tokenizer, device=args.device,
                          progress=not args.no_progress, tensorboard=True)
        summary = trainer.fit()
        trainer.close()
        timings[f"train {name}"] = time.time() - t
        histories[name] = summary["history"]
        _say(f"[demo]     {name}: {summary['global_step']} steps in {timings[f'train {name}']:.1f} s, "
             f"final loss {summary['final_loss']:.3f}; evaluating on the test split")
        t = time.time()
        res, es = evaluate_model(trainer.model, tokenizer, data, run_cfg.image_size)
        timings[f"eval {name}"] = time.time() - t
        results[name], sets[name], models[name] = res, es, trainer.model
    _say("[demo] 4/4 results on the held-out split (%):\n")
    _say(format_table(results))
    _say("")
    for line in _findings(results):
        _say("  * " + line)
    timings["total"] = time.time() - t_all
    files = write_report(report, args, cfg, results, histories, timings, sets, models, tokenizer,
                         n_train, n_test)
    _say(f"\n[demo] report: {files[0]} (+ {len(files) - 1} files); total {timings['total']:.0f} s")
    return 0
