"""The evaluation report: report.md (tables with intervals, protocol notes), results.json (every
number; reproduced exactly by the same model, data and seed), timing.json (wall times) and PNG
figures (recall@K curves, zero-shot confusion matrices, images with their annotated and proposed
boxes and top retrieved texts, grounding examples). Figures need matplotlib (the ``report``
extra); without it they are skipped with one logged line and the report says so.

The same tables feed ``regionmed-fast eval``'s printed summary (:func:`summary_lines`), so what
the command prints and what the report says are one text. A difference is called higher or
lower only when its 95 % interval excludes 0, otherwise "cannot be told apart".
"""
from __future__ import annotations

import json
import logging
import math
import pathlib
import textwrap

import torch

from regionmed_fast.data.transforms import denormalize

from .embed import EvalSet, load_batch

log = logging.getLogger("regionmed_fast.eval")

INTERVAL_NOTE = ("Intervals: 95 % bootstrap over the test items (images, texts or questions) of "
                 "this one trained model; the spread over training seeds is not in them. A "
                 "difference is called higher or lower only when its interval excludes 0.")
FIGURES_MISSING = ("report figures skipped: matplotlib is not installed "
                   "(pip install 'regionmed-fast[report]')")


def clean(x):
    """JSON-able copy: NaN/inf -> None, tensors -> lists."""
    if isinstance(x, float):
        return None if math.isnan(x) or math.isinf(x) else x
    if isinstance(x, dict):
        return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    if torch.is_tensor(x):
        return clean(x.tolist())
    return x


def pct(x, ci=None) -> str:
    """``31.2`` or ``31.2 [24.0, 38.5]`` (percent), ``-`` for a missing number."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    s = f"{100 * x:.1f}"
    if ci and all(v is not None and v == v for v in ci):
        s += f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"
    return s


def signed(d: dict) -> str:
    """A difference with its interval and verdict, in percentage points."""
    lo, hi = d["ci95"]
    return (f"{100 * d['diff']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] points: "
            f"{d['verdict']}")


# ----------------------------------------------------------------------------- tables

def retrieval_table(r: dict) -> tuple[list[str], list[list]]:
    rows = []
    for direction in ("image_to_text", "text_to_image"):
        for row, s in r[direction].items():
            rows.append([direction.replace("_", " "), row, pct(s["R@1"], s.get("R@1_ci95")),
                         pct(s["R@5"], s.get("R@5_ci95")), pct(s["R@10"], s.get("R@10_ci95")),
                         f"{s['median_rank']:g}", s["n_queries"]])
    rt = r.get("region_to_text", {})
    if "R@1" in rt:
        rows.append(["region to text", "oracle_boxes (regions)", pct(rt["R@1"], rt.get("R@1_ci95")),
                     pct(rt["R@5"], rt.get("R@5_ci95")), pct(rt["R@10"], rt.get("R@10_ci95")),
                     f"{rt['median_rank']:g}", rt["n_queries"]])
    return ["task", "embedding", "R@1", "R@5", "R@10", "median rank", "queries"], rows


def zeroshot_table(z: dict) -> tuple[list[str], list[list]]:
    rows = []
    for row, v in z["by_embedding"].items():
        sp = v["prompt_spread"]
        rows.append([row, pct(v["accuracy"], v.get("accuracy_ci95")),
                     pct(v["balanced_accuracy"]), pct(v["macro_auroc"], v.get("macro_auroc_ci95")),
                     f"{pct(sp['accuracy']['min'])}-{pct(sp['accuracy']['max'])}",
                     f"{pct(sp['macro_auroc']['min'])}-{pct(sp['macro_auroc']['max'])}"])
    return (["image embedding", "accuracy", "balanced acc.", "macro AUROC",
             "acc. per prompt set (min-max)", "AUROC per prompt set (min-max)"], rows)


def grounding_table(g: dict) -> tuple[list[str], list[list]]:
    rows = []
    pg, pc, bc = g.get("pointing_game", {}), g.get("proposed_box_choice", {}), g.get("box_choice", {})
    if "hit_rate" in pg:
        rows.append(["pointing game (arg-max of patch-text similarity)", pct(pg["hit_rate"]),
                     f"image centre {pct(pg['centre_baseline'])}", pg["n_queries"]])
    if "accuracy" in pc:
        rows.append(["phrase -> proposed box (no annotation given)", pct(pc["accuracy"]),
                     f"chance {pct(pc['chance'])}", pc["n_queries"]])
    if "proposal_hit_rate" in pc:
        rows.append(["annotated boxes found by a proposed box", pct(pc["proposal_hit_rate"]),
                     f"shuffled proposals {pct(pc['proposal_hit_rate_shuffled'])}",
                     pc["n_annotated_boxes"]])
    if "accuracy" in bc:
        rows.append(["phrase -> annotated box (oracle boxes)", pct(bc["accuracy"]),
                     f"chance {pct(bc['chance'])}", bc["n_queries"]])
    return ["task", "score (%)", "baseline (%)", "queries"], rows


def vqa_table(v: dict) -> tuple[list[str], list[list]]:
    rows = []
    for row, r in v["by_embedding"].items():
        c = r["blank_image_control"]
        rows.append([row, pct(r["accuracy"], r.get("accuracy_ci95")), pct(r["closed_accuracy"]),
                     pct(r["open_accuracy"]), pct(c["accuracy"], c.get("accuracy_ci95")),
                     pct(c["closed_accuracy"]), pct(c["open_accuracy"]),
                     signed(r["minus_blank"])])
    pb = v["prior_baseline"]
    rows.append(["question prior (no image)", pct(pb["accuracy"], pb.get("accuracy_ci95")),
                 pct(pb["closed_accuracy"]), pct(pb["open_accuracy"]), "", "", "", ""])
    return (["image embedding", "all", "closed", "open", "blank image: all", "closed", "open",
             "minus blank image"], rows)


def differences_table(diffs: list[dict]) -> tuple[list[str], list[list]]:
    return (["metric", "difference", "points [95 % interval]: verdict"],
            [[d["metric"], f"{d['a']} - {d['b']}", signed(d)] for d in diffs])


def _md(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _text(header: list[str], rows: list[list], indent: str = "  ") -> list[str]:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]


def _task_sections(res: dict, oracle: bool = False):
    """(title, notes, tables) per task of a results dict (or of its oracle section)."""
    r = res.get("retrieval")
    if r:
        yield ("Retrieval", [f"{r['n_images']} images, {r['n_unique_texts']} distinct texts after "
                             "deduplication (identical texts are one key; every image carrying it "
                             "is a correct target; ties count against the model). Recall in %."],
               [retrieval_table(r)] + ([differences_table(r["differences"])]
                                       if r.get("differences") else []))
    z = res.get("zeroshot")
    if z and "skipped" not in z:
        mb = z["majority_baseline"]
        notes = [f"Classes ({len(z['classes'])}): {', '.join(z['classes'])}; support {z['support']}; "
                 f"{z['n_left_out']} images without a class label left out. Prompt family "
                 f"`{z['prompt_family']}`: the headline is the ensemble of all "
                 f"{sum(len(s) for s in z['prompt_sets'])} templates of the {len(z['prompt_sets'])} "
                 "prompt sets; each set alone gives the min-max columns. Majority-class baseline: "
                 f"accuracy {pct(mb['accuracy'])}, balanced accuracy {pct(mb['balanced_accuracy'])}."]
        yield ("Zero-shot classification", notes,
               [zeroshot_table(z)] + ([differences_table(z["differences"])]
                                      if z.get("differences") else []))
    elif z:
        yield "Zero-shot classification", [f"Skipped: {z['skipped']}."], []
    g = res.get("grounding")
    if g:
        if "skipped" in g:
            yield "Region grounding", [f"Skipped: {g['skipped']}."], []
        else:
            skipped = [f"{k.replace('_', ' ')}: skipped ({d['skipped']})." for k, d in g.items()
                       if isinstance(d, dict) and "skipped" in d]
            yield "Region grounding", skipped, [grounding_table(g)]
    v = res.get("vqa")
    if v and not oracle:
        if "skipped" in v:
            yield "VQA", [f"QA source: {v.get('qa_source')}.", f"Skipped: {v['skipped']}."], []
        else:
            yield ("VQA", [f"QA source: {v['qa_source']}. Protocol: {v['protocol']}. Oracle boxes: "
                           f"{v['oracle_boxes']}. Accuracy in %; test questions {v['n_test']} "
                           f"({v['n_closed']} closed, {v['n_open']} open)."],
                   [vqa_table(v)] + ([differences_table(v["differences"])]
                                     if v.get("differences") else []))


def summary_lines(res: dict) -> list[str]:
    """The printed summary of ``regionmed-fast eval`` (plain-text tables)."""
    lines = [f"{res['n_images']} images ({res['split']} split), image size {res['image_size']}; "
             f"rows: {', '.join(res['rows'])}", INTERVAL_NOTE]
    for title, notes, tables in _task_sections(res):
        lines.append(f"{title}:")
        lines += ["  " + n for n in notes if n.startswith("Skipped") or "skipped" in n]
        for header, rows in tables:
            lines += _text(header, rows)
    o = res.get("oracle")
    if o and "skipped" not in o:
        lines.append(f"Oracle boxes, apart from the headline ({o['n_images']} images with annotated "
                     "boxes):")
        for title, _, tables in _task_sections(o, oracle=True):
            lines.append(f"  {title}:")
            for header, rows in tables:
                lines += _text(header, rows, indent="    ")
    if res.get("report_files"):
        lines.append(f"report: {', '.join(res['report_files'])}")
    return lines


def markdown(res: dict, figures: list[str], figure_note: str | None) -> str:
    rule = res["split_rule"]
    out = ["# Evaluation report\n",
           f"Data: `{res['data_dir']}`, split `{res['split']}` (records without a split field: "
           f"group key {rule['group_key'] or 'patient_id, else the image'}, test fraction "
           f"{rule['test_fraction']}, val fraction {rule['val_fraction']}; from: "
           f"{', '.join(f'{k} {v}' for k, v in rule['source'].items())}): "
           f"{res['n_images']} images ({res['n_images_with_boxes']} with annotated boxes), "
           f"{res['n_regions']} annotated regions; image size {res['image_size']}; model "
           f"{'region-aware (RoI processor)' if res['region_aware'] else 'global-only'}.\n",
           "Headline rows (no annotation at test time): `global` (the global embedding)"
           + (", `proposed_boxes` (the region-aware embedding with the model's own proposed "
              f"boxes, proposer {res['proposer']})" if res["region_aware"] else "") + ".\n",
           INTERVAL_NOTE + "\n"]
    for title, notes, tables in _task_sections(res):
        out.append(f"## {title}\n")
        out += [n + "\n" for n in notes]
        out += [_md(*t) + "\n" for t in tables]
    o = res.get("oracle")
    if o:
        out.append("## Oracle boxes (apart from the headline)\n")
        if "skipped" in o:
            out.append(f"Skipped: {o['skipped']}.\n")
        else:
            out.append(f"{o['note'][0].upper() + o['note'][1:]}. {o['n_images']} images.\n")
            for title, notes, tables in _task_sections(o, oracle=True):
                out.append(f"### {title}\n")
                out += [n + "\n" for n in notes]
                out += [_md(*t) + "\n" for t in tables]
    out.append("## Files\n")
    if figure_note:
        out.append(figure_note + ".\n")
    out += [f"- `{f}`" for f in figures + ["results.json", "timing.json", "report.md"]]
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- figures

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _display(img: torch.Tensor):
    return (denormalize(img[None])[0] / 255).clamp(0, 1).permute(1, 2, 0).numpy()


def _fig_recall(plt, res: dict, es: EvalSet, path: pathlib.Path) -> bool:
    curves = res.get("retrieval", {}).get("curves") or {}
    if not curves:
        return False
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


def _fig_confusion(plt, res: dict, es: EvalSet, path: pathlib.Path) -> bool:
    zs = res.get("zeroshot", {})
    by = zs.get("by_embedding") or {}
    if not by:
        return False
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
        ax.set_title(f"zero-shot, {kind}\nacc {100 * r['accuracy']:.1f}%", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _draw_boxes(ax, boxes, color="lime", ls="-"):
    import matplotlib.patches as patches

    for b in boxes:
        x1, y1, x2, y2 = [float(v) for v in b]
        ax.add_patch(patches.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color,
                                       lw=1.2, ls=ls))


def _fig_grid(plt, res: dict, es: EvalSet, path: pathlib.Path, n: int = 8) -> bool:
    top = res.get("retrieval", {}).get("top_texts")
    if not top:
        return False
    uniq = res["retrieval"]["unique_texts"]
    n = min(n, es.n_images)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 5.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    S = es.image_size
    images = load_batch(es.records[:n], S)["images"]
    for i in range(n):
        ax = axes.flat[i]
        ax.imshow(_display(images[i]), extent=(0, S, S, 0))  # pixel i covers [i, i+1)
        _draw_boxes(ax, es.boxes[i])
        if es.proposed is not None:
            _draw_boxes(ax, es.proposed.boxes[i], color="cyan", ls="--")
        lines = []
        for rank, t in enumerate(top["indices"][i], 1):
            mark = "+" if t == top["target"][i] else "-"
            lines.append(textwrap.shorten(f"{rank}{mark} {uniq[t]}", 60))
        ax.set_title("\n".join(lines), fontsize=6, loc="left")
    fig.suptitle(f"top retrieved texts ({top['embedding']}; + = the image's own text); green: "
                 "annotated boxes (not given to the model), cyan dashed: proposed boxes", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _fig_grounding(plt, res: dict, es: EvalSet, path: pathlib.Path) -> bool:
    ex = res.get("grounding", {}).get("examples")
    if not ex:
        return False
    cols = min(3, len(ex))
    rows = math.ceil(len(ex) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    S = es.image_size
    images = load_batch([es.records[e["image"]] for e in ex], S)["images"]
    for ax, e, img in zip(axes.flat, ex, images):
        ax.imshow(_display(img), extent=(0, S, S, 0))
        m = torch.tensor(e["map"])
        ax.imshow(m.numpy(), cmap="jet", alpha=0.35, extent=(0, S, S, 0), interpolation="bilinear")
        _draw_boxes(ax, e["boxes"])
        ax.plot([e["point"][0]], [e["point"][1]], marker="x", color="white" if e["hit"] else "red",
                ms=10, mew=2)
        ax.set_title(textwrap.shorten(e["phrase"], 45) + ("  [hit]" if e["hit"] else "  [miss]"),
                     fontsize=7)
    fig.suptitle("pointing game: similarity map, target box(es), arg-max point", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


FIGURES = (("recall_at_k.png", _fig_recall), ("zeroshot_confusion.png", _fig_confusion),
           ("retrieval_grid.png", _fig_grid), ("grounding_examples.png", _fig_grounding))


def figures_available() -> bool:
    """True when matplotlib can be imported (the ``report`` extra, optional: imported here and
    not at module top so that a core install still writes the tables)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_report(results: dict, es: EvalSet, report_dir: str | pathlib.Path,
                 timing: dict | None = None) -> list[str]:
    """Write the report into ``report_dir`` (created); returns the file names written."""
    d = pathlib.Path(report_dir)
    d.mkdir(parents=True, exist_ok=True)
    figs: list[str] = []
    note = None
    if figures_available():
        plt = _plt()
        figs = [name for name, fn in FIGURES if fn(plt, results, es, d / name)]
    else:
        note = FIGURES_MISSING
        log.warning(note)
    files = figs + ["results.json", "timing.json", "report.md"]
    (d / "report.md").write_text(markdown(results, figs, note))
    payload = {k: v for k, v in results.items() if k != "timing_s"}
    payload["report_files"] = files
    (d / "results.json").write_text(json.dumps(clean(payload), indent=1, allow_nan=False))
    (d / "timing.json").write_text(json.dumps(timing or {}, indent=1))
    return files
