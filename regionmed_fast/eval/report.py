"""Write an evaluation report: report.md (tables, protocol notes), results.json (every number)
and PNG figures (recall@K curves, zero-shot confusion matrices, a grid of images with their
boxes and top retrieved texts, grounding examples). Returns the list of files written."""
from __future__ import annotations

import json
import math
import pathlib
import textwrap

import torch

from .embed import CLIP_MEAN, CLIP_STD, EvalSet, load_image


def _clean(x):
    """JSON-able copy: NaN/inf -> None, tensors -> lists."""
    if isinstance(x, float):
        return None if math.isnan(x) or math.isinf(x) else x
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if torch.is_tensor(x):
        return _clean(x.tolist())
    return x


def _f(x, pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, int) and not pct:
        return str(x)
    return f"{100 * x:.1f}" if pct else f"{x:.3g}" if isinstance(x, float) else str(x)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _display(img: torch.Tensor):
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (img * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fig_recall(res: dict, path: pathlib.Path) -> bool:
    curves = res.get("retrieval", {}).get("curves") or {}
    if not curves:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, c in curves.items():
        ax.plot(range(1, len(c) + 1), [100 * v for v in c], marker=".", label=name)
    ax.set_xlabel("K")
    ax.set_ylabel("recall@K (%)")
    ax.set_ylim(0, 101)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("retrieval recall@K (deduplicated texts)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _fig_confusion(res: dict, path: pathlib.Path) -> bool:
    zs = res.get("zeroshot", {})
    by = zs.get("by_embedding") or {}
    if not by:
        return False
    plt = _plt()
    classes = zs["classes"]
    fig, axes = plt.subplots(1, len(by), figsize=(4.5 * len(by) + 0.5, 4.2), squeeze=False)
    for ax, (kind, r) in zip(axes[0], by.items()):
        cm = torch.tensor(r["confusion_matrix"], dtype=torch.float64)
        ax.imshow(cm.numpy(), cmap="Blues")
        for i in range(cm.shape[0]):
            for j in range(cm.shape[1]):
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7)
        short = [c[:12] for c in classes]
        ax.set_xticks(range(len(classes)), short, rotation=60, fontsize=7, ha="right")
        ax.set_yticks(range(len(classes)), short, fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"zero-shot, {kind} embedding\nacc {100 * r['accuracy']:.1f}%", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _draw_boxes(ax, boxes, color="lime"):
    import matplotlib.patches as patches

    for b in boxes:
        x1, y1, x2, y2 = [float(v) for v in b]
        ax.add_patch(patches.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, lw=1.2))


def _fig_grid(res: dict, es: EvalSet, path: pathlib.Path, n: int = 8) -> bool:
    top = res.get("retrieval", {}).get("top_texts")
    if not top:
        return False
    plt = _plt()
    uniq = res["retrieval"]["unique_texts"]
    n = min(n, es.n_images)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 5.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        ax = axes.flat[i]
        img, boxes = load_image(es.records[i], es.image_size)
        ax.imshow(_display(img), extent=(0, es.image_size, es.image_size, 0))  # pixel i covers [i, i+1)
        _draw_boxes(ax, boxes)
        lines = []
        for rank, t in enumerate(top["indices"][i], 1):
            mark = "+" if t == top["target"][i] else "-"
            lines.append(textwrap.shorten(f"{rank}{mark} {uniq[t]}", 60))
        ax.set_title("\n".join(lines), fontsize=6, loc="left")
    fig.suptitle(f"top retrieved texts ({top['embedding']} embedding; + = the image's own text)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _fig_grounding(res: dict, es: EvalSet, path: pathlib.Path) -> bool:
    ex = res.get("grounding", {}).get("examples")
    if not ex:
        return False
    plt = _plt()
    cols = min(3, len(ex))
    rows = math.ceil(len(ex) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    S = es.image_size
    for ax, e in zip(axes.flat, ex):
        img, _ = load_image(es.records[e["image"]], S)
        ax.imshow(_display(img), extent=(0, S, S, 0))
        m = torch.tensor(e["map"])
        ax.imshow(m.numpy(), cmap="jet", alpha=0.35, extent=(0, S, S, 0), interpolation="bilinear")
        _draw_boxes(ax, e["boxes"])
        ax.plot([e["point"][0]], [e["point"][1]], marker="x", color="white" if e["hit"] else "red", ms=10, mew=2)
        ax.set_title(textwrap.shorten(e["phrase"], 45) + ("  [hit]" if e["hit"] else "  [miss]"), fontsize=7)
    fig.suptitle("pointing game: similarity map, target box(es), arg-max point", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _markdown(res: dict, figures: list[str]) -> str:
    out = [f"# Evaluation report\n",
           f"Data: `{res['data_dir']}`, split `{res['split']}`: {res['n_images']} images, "
           f"{res['n_regions']} regions; image size {res['image_size']}; "
           f"model {'region-aware (ROI processor)' if res['region_aware'] else 'global-only'}.\n"]
    r = res.get("retrieval")
    if r:
        out.append("## Retrieval\n")
        out.append(f"{r['n_images']} images, {r['n_unique_texts']} distinct texts after deduplication "
                   "(identical texts are one key; every image carrying it is a correct target; ties count "
                   "against the model). Recall in %.\n")
        rows = []
        for direction in ("image_to_text", "text_to_image"):
            for kind, s in r[direction].items():
                rows.append([direction.replace("_", " "), kind, _f(s["R@1"], True), _f(s["R@5"], True),
                             _f(s["R@10"], True), _f(s["median_rank"]), s["n_queries"]])
        rt = r.get("region_to_text", {})
        if "R@1" in rt:
            rows.append(["region to text", "region", _f(rt["R@1"], True), _f(rt["R@5"], True),
                         _f(rt["R@10"], True), _f(rt["median_rank"]), rt["n_queries"]])
        out.append(_table(["task", "embedding", "R@1", "R@5", "R@10", "median rank", "queries"], rows))
        if "skipped" in rt:
            out.append(f"\nRegion-to-text skipped: {rt['skipped']}.")
        out.append("")
    z = res.get("zeroshot")
    if z:
        out.append("## Zero-shot classification\n")
        if "skipped" in z:
            out.append(f"Skipped: {z['skipped']}.\n")
        else:
            out.append(f"Classes ({len(z['classes'])}): {', '.join(z['classes'])}; support {z['support']}; "
                       f"{z['n_left_out']} images without a class label left out. Templates "
                       f"(`{z['template_set']}`, embeddings averaged): " + "; ".join(f"\"{t}\"" for t in z["templates"]) + ".\n")
            ml = any("multilabel_macro_auroc" in v for v in z["by_embedding"].values())
            rows = [[k, _f(v["accuracy"], True), _f(v["balanced_accuracy"], True), _f(v["macro_auroc"], True),
                     _f(v["accuracy_any_label"], True)] + ([_f(v.get("multilabel_macro_auroc"), True)] if ml else [])
                    for k, v in z["by_embedding"].items()]
            out.append(_table(["image embedding", "accuracy", "balanced acc.", "macro AUROC", "acc. (any label)"]
                              + (["multi-label macro AUROC"] if ml else []), rows))
            mb = z.get("majority_baseline")
            out.append("\nTarget = each image's first label among the classes; AUROC one-vs-rest on cosine scores."
                       + (f" Majority-class baseline: accuracy {_f(mb['accuracy'], True)}, balanced accuracy "
                          f"{_f(mb['balanced_accuracy'], True)}." if mb else ""))
            out.append("")
    g = res.get("grounding")
    if g:
        out.append("## Region grounding\n")
        if "skipped" in g:
            out.append(f"Skipped: {g['skipped']}.\n")
        else:
            bc, pg = g.get("box_choice", {}), g.get("pointing_game", {})
            rows = []
            if "accuracy" in bc:
                rows.append(["box choice (phrase -> box among the image's boxes)", _f(bc["accuracy"], True),
                             f"chance {_f(bc['chance'], True)}", bc["n_queries"]])
            if "hit_rate" in pg:
                rows.append(["pointing game (arg-max of patch-text similarity)", _f(pg["hit_rate"], True),
                             f"image centre {_f(pg['centre_baseline'], True)}", pg["n_queries"]])
            if rows:
                out.append(_table(["task", "score (%)", "baseline (%)", "queries"], rows))
            for name, d in (("box choice", bc), ("pointing game", pg)):
                if "skipped" in d:
                    out.append(f"\n{name}: skipped ({d['skipped']}).")
            out.append("")
    v = res.get("vqa")
    if v:
        out.append("## VQA\n")
        out.append(f"QA source: {v.get('qa_source')}.\n")
        if "skipped" in v:
            out.append(f"Skipped: {v['skipped']}.\n")
        else:
            out.append(f"Protocol: {v['protocol']}; image embedding: {v.get('image_embedding')}.\n")
            pb = v["prior_baseline"]
            out.append(_table(["", "all", "closed (yes/no)", "open", "n test (closed/open)"], [
                ["frozen encoders + head", _f(v["accuracy"], True), _f(v["closed_accuracy"], True),
                 _f(v["open_accuracy"], True), f"{v['n_test']} ({v['n_closed']}/{v['n_open']})"],
                ["question-prior baseline", _f(pb["accuracy"], True), _f(pb["closed_accuracy"], True),
                 _f(pb["open_accuracy"], True), ""]]))
            out.append("")
    out.append("## Files\n")
    out += [f"- `{f}`" for f in figures + ["results.json", "report.md"]]
    return "\n".join(out) + "\n"


def write_report(results: dict, es: EvalSet, report_dir: str | pathlib.Path) -> list[str]:
    """Write the report into ``report_dir`` (created); returns the file names written."""
    d = pathlib.Path(report_dir)
    d.mkdir(parents=True, exist_ok=True)
    figs = []
    for name, fn in (("recall_at_k.png", lambda p: _fig_recall(results, p)),
                     ("zeroshot_confusion.png", lambda p: _fig_confusion(results, p)),
                     ("retrieval_grid.png", lambda p: _fig_grid(results, es, p)),
                     ("grounding_examples.png", lambda p: _fig_grounding(results, es, p))):
        if fn(d / name):
            figs.append(name)
    files = figs + ["results.json", "report.md"]
    (d / "report.md").write_text(_markdown(results, figs))
    payload = dict(results)
    payload["report_files"] = files
    (d / "results.json").write_text(json.dumps(_clean(payload), indent=1, allow_nan=False))
    return files
