"""The study's report (``regionmed_fast.apps.study``): ``study.md`` (tables with intervals and
verdicts, the lever selection, the oracle rows apart, the loss against the plateau),
``study_loss_curves.png`` (with matplotlib; one line without it), the printed summary and the
README paragraph, all rendered from the results JSON alone."""
from __future__ import annotations

import math
import pathlib
import statistics

from regionmed_fast.eval.compare import HELPS, HURTS

REGION, BASELINE = "region-aware", "global-only"
METRIC_ORDER = ("i2t_r10", "t2i_r10", "zs_auroc", "vqa_acc")
SIZE_ORDER = ("zs_acc_small", "zs_acc_medium", "zs_acc_large")
ROW_NAMES = {"global": "global embedding", "proposed_boxes": "proposed boxes",
             "oracle_boxes": "oracle boxes"}
CURVES_PNG = "study_loss_curves.png"
FIGURE_MISSING = ("loss-curve figure skipped: matplotlib is not installed "
                  "(pip install 'regionmed-fast[report]')")


def pct(x) -> str:
    return "-" if x is None or x != x else f"{100 * x:.1f}"


def mean_sd(xs: list) -> str:
    ok = [x for x in xs if x is not None and x == x]
    if not ok:
        return "-"
    if len(ok) == 1:
        return pct(ok[0])
    return f"{100 * statistics.fmean(ok):.1f} ± {100 * statistics.stdev(ok):.1f}"


def interval(c: dict) -> str:
    lo, hi = c["ci95"]
    if c["diff"] is None or lo is None or hi is None:
        return "-"
    return f"{100 * c['diff']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def _per_seed(runs: list[dict], metric: str, row: str) -> list:
    return [r["summary"]["metrics"].get(metric, {}).get(row) for r in runs]


def _end_loss(curves: dict, key: str = "global_per_seed", share: float = 0.1) -> list[float]:
    """Per seed: the mean of the last ``share`` of the first (global) stage's steps: the
    hierarchical stage's global loss is HN-NCE (beta > 0), not comparable to the plateau."""
    last = curves["stages"][0]
    out = []
    for xs in last[key]:
        k = max(1, int(len(xs) * share))
        out.append(statistics.fmean(xs[-k:]))
    return out


def _first_loss(curves: dict, key: str = "global_per_seed") -> list[float]:
    return [xs[0] for xs in curves["stages"][0][key]]


def budget_line(res: dict) -> str:
    st = res["study"]
    b = st["budget"]
    chosen = "; ".join(f"`{ds}`: {f['setting_name']}" for ds, f in res["final"].items())
    return (f"Model `{b['model']}` ({'tiny test-sized overrides, ' if b['model_args'] else ''}"
            f"pretrained MiniLM text tower frozen and cached, `text_proj` trained), {b['steps']} "
            f"optimizer steps per run, batch {b['batch_size']}, {b['image_size']} px, lr "
            f"{b['lr']:g} (warm-up {b['warmup']:g} of each stage, cosine), fp32 on "
            f"{st['device']} ({st['threads']} threads); {augmentation_text(st)}; settings chosen on "
            f"val: {chosen}; final seeds {st['seeds']}.")


def augmentation_text(st: dict) -> str:
    """What the runs were trained with, from the results (older results carry no field: those
    runs had no augmentation)."""
    a = st.get("augmentation")
    if not a:
        return "no augmentation (the trainer's data path had none)"
    lo, hi = a["crop_scale"]
    return (f"augmentation: box-aware random resized crop (area {lo:g}-{hi:g}) and side-aware "
            f"flips (p {a['flip_p']:g}; left/right words swapped with the image) through the "
            "trainer's data.make_loader")


def split_lines(res: dict) -> list[str]:
    out = []
    for ds, info in res["study"]["datasets"].items():
        sel, fin = info["select"], info["final"]

        def c(d, s):
            return f"{d[s]['images']} images ({d[s]['groups']} groups)" if s in d else "0"
        out.append(f"* `{ds}` (group key: {info['group_key']}): lever selection trains on "
                   f"{c(sel, 'train')} and scores val {c(sel, 'val')}; the final runs train on "
                   f"{c(fin, 'train')} (train + val) and score test {c(fin, 'test')}.")
    return out


def selection_md(res: dict) -> list[str]:
    sel = res["selection"]
    if "skipped" in sel:
        return [f"Lever selection skipped ({sel['skipped']}); every dataset: the default setting.", ""]
    lines = [f"Criterion: {sel['criterion']}; split: {sel['split']}; seeds {sel['seeds']}. "
             "Groups are tried in order, each with the best of the groups before it; a tie keeps "
             "the earlier candidate. Only the region-aware model is trained here. Mean over the "
             "seeds (%); `score` is the criterion, `Δ` the score minus the default setting's.",
             "", "No region-to-global attention lever exists: the RoI processor's attention "
             "produces only the fused (region-aware) embedding; the global embedding never "
             "sees a region token.", ""]
    for ds, d in sel["per_dataset"].items():
        lines += [f"#### {ds}: chosen {d['chosen_name']}", "",
                  "| lever | setting | score | Δ | " + " | ".join(
                      f"{ROW_SHORT[r]} {_short(m)}" for m in METRIC_ORDER for r in ROW_SHORT)
                  + " |", "| --- | --- | ---: | ---: |" + " ---: |" * (2 * len(METRIC_ORDER))]
        base = d["groups"][0]["candidates"][0]["score"] if d["groups"] else None
        for g in d["groups"]:
            for c in g["candidates"]:
                cells = [pct(c["metrics"].get(m, {}).get(r)) for m in METRIC_ORDER for r in ROW_SHORT]
                delta = f"{100 * (c['score'] - base):+.1f}" if base is not None else "-"
                lines.append(f"| {g['title']} | {c['name']} | {pct(c['score'])} | {delta} | "
                             + " | ".join(cells) + " |")
        lines.append("")
    return lines


ROW_SHORT = {"global": "glob.", "proposed_boxes": "prop."}
_SHORT = {"i2t_r10": "I→T R@10", "t2i_r10": "T→I R@10", "zs_auroc": "ZS AUROC", "vqa_acc": "VQA"}


def _short(m: str) -> str:
    return _SHORT.get(m, m)


def verdict_cell(c: dict) -> str:
    v = c["verdict"]
    return f"**{v}**" if v in (HELPS, HURTS) else v


def final_md(res: dict) -> list[str]:
    lines = []
    for ds, f in res["final"].items():
        runs = f["runs"]
        n_test = runs[REGION][0]["summary"]["n_images"]
        lines += [f"#### {ds}", "",
                  f"Test split: {n_test} images. Mean ± sd over {len(runs[REGION])} seeds (%); "
                  "Δ = region-aware minus global-only with its 95 % two-level paired bootstrap "
                  "interval (points).", "",
                  "| metric | region-aware: global | region-aware: proposed boxes | global-only: "
                  "global | Δ global [95 %] | verdict | Δ proposed boxes [95 %] | verdict |",
                  "| --- | ---: | ---: | ---: | ---: | --- | ---: | --- |"]
        by = {(c["metric"], c["row"]): c for c in f["comparisons"]}
        for m in METRIC_ORDER:
            if (m, "global") not in by:
                continue
            cg, cp = by[(m, "global")], by.get((m, "proposed_boxes"))
            lines.append(
                f"| {cg['label']} | {mean_sd(_per_seed(runs[REGION], m, 'global'))} | "
                f"{mean_sd(_per_seed(runs[REGION], m, 'proposed_boxes'))} | "
                f"{mean_sd(_per_seed(runs[BASELINE], m, 'global'))} | {interval(cg)} | "
                f"{verdict_cell(cg)} | {interval(cp) if cp else '-'} | "
                f"{verdict_cell(cp) if cp else '-'} |")
        lines.append("")
        sizes = [m for m in SIZE_ORDER if (m, "global") in by]
        if sizes:
            lines += ["By lesion size (top-1 zero-shot accuracy over the test images grouped by "
                      "their largest finding; 'small' = every finding in the image is small):", "",
                      "| lesion size | images | region-aware: global | region-aware: proposed "
                      "boxes | global-only: global | Δ global [95 %] | verdict | Δ proposed "
                      "boxes [95 %] | verdict |",
                      "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- |"]
            for m in sizes:
                cg, cp = by[(m, "global")], by.get((m, "proposed_boxes"))
                lines.append(
                    f"| {m.rsplit('_', 1)[1]} | {cg['n_items']} | "
                    f"{mean_sd(_per_seed(runs[REGION], m, 'global'))} | "
                    f"{mean_sd(_per_seed(runs[REGION], m, 'proposed_boxes'))} | "
                    f"{mean_sd(_per_seed(runs[BASELINE], m, 'global'))} | {interval(cg)} | "
                    f"{verdict_cell(cg)} | {interval(cp) if cp else '-'} | "
                    f"{verdict_cell(cp) if cp else '-'} |")
            lines.append("")
        ctl = [r["summary"]["controls"] for r in runs[BASELINE]]
        notes = []
        if ctl and "vqa_question_prior" in ctl[0]:
            blank = [c["vqa_blank_image"].get("global") for c in ctl]
            notes.append(f"VQA controls (global-only model): blank image {mean_sd(blank)}, "
                         f"question prior {pct(ctl[0]['vqa_question_prior'])}.")
        if ctl and "zs_classes" in ctl[0]:
            notes.append(f"Zero-shot classes {ctl[0]['zs_classes']} (support "
                         f"{ctl[0]['zs_support']}).")
        if ctl and "n_unique_texts" in ctl[0]:
            n = ctl[0]["n_unique_texts"]
            notes.append(f"Retrieval: {n} distinct texts (chance image-to-text R@10 about "
                         f"{100 * min(1.0, 10 / n):.0f} %).")
        pl = f["plateau"]
        e_r, e_b = _end_loss(f["curves"][REGION]), _end_loss(f["curves"][BASELINE])
        notes.append(f"Global loss, first step -> last 10 % of the global stage (mean over "
                     f"seeds; both models train the same global-only stage there): region-aware "
                     f"{statistics.fmean(_first_loss(f['curves'][REGION])):.2f} -> "
                     f"{statistics.fmean(e_r):.2f}, global-only "
                     f"{statistics.fmean(_first_loss(f['curves'][BASELINE])):.2f} -> "
                     f"{statistics.fmean(e_b):.2f}; modality plateau ln({pl['batch_size']}/"
                     f"{pl['modalities']}) = {pl['loss']:.2f}; runs whose global stage ends "
                     f"below it: {sum(x < pl['loss'] for x in e_r + e_b)} of {len(e_r) + len(e_b)}. "
                     "Each stage restarts its warm-up and cosine schedule (the jumps at the stage "
                     "boundaries of both models), and the last stage's losses are HN-NCE.")
        lines += [" ".join(notes), ""]
    return lines


def oracle_md(res: dict) -> list[str]:
    lines = ["Oracle boxes: the test images' annotated boxes given to the region-aware model, over "
             "the test images that have annotated boxes only, next to its own rows on the same "
             "images; mean ± sd over seeds (%). Not comparable to a model that gets no "
             "annotation, and not part of any verdict.", "",
             "| dataset | images | row | image-to-text R@10 | text-to-image R@10 | zero-shot macro AUROC |",
             "| --- | ---: | --- | ---: | ---: | ---: |"]
    for ds, f in res["final"].items():
        orc = [r["summary"].get("oracle", {}) for r in f["runs"][REGION]]
        if not orc or "rows" not in orc[0]:
            why = orc[0].get("skipped", "no oracle section") if orc else "no runs"
            lines.append(f"| {ds} | - | ({why}) | | | |")
            continue
        for row in orc[0]["rows"]:
            cells = [mean_sd([o["rows"][row][m] for o in orc]) for m in ("i2t_r10", "t2i_r10", "zs_auroc")]
            lines.append(f"| {ds} | {orc[0]['n_images']} | region-aware: {ROW_NAMES[row]} | "
                         + " | ".join(cells) + " |")
    return lines + [""]


def verdict_grid(res: dict) -> list[str]:
    """dataset x metric x row -> verdict, as a Markdown table."""
    lines = ["| dataset | row | " + " | ".join(_label(res, m) for m in METRIC_ORDER) + " |",
             "| --- | --- |" + " --- |" * len(METRIC_ORDER)]
    for ds, f in res["final"].items():
        by = {(c["metric"], c["row"]): c for c in f["comparisons"]}
        for row in ("global", "proposed_boxes"):
            cells = []
            for m in METRIC_ORDER:
                c = by.get((m, row))
                cells.append(f"{verdict_cell(c)} ({interval(c)})" if c else "-")
            lines.append(f"| {ds} | {ROW_NAMES[row]} | " + " | ".join(cells) + " |")
    return lines


def _label(res: dict, metric: str) -> str:
    for f in res["final"].values():
        for c in f["comparisons"]:
            if c["metric"] == metric:
                return c["label"]
    return metric


def run_minutes(res: dict) -> float:
    """Summed training + evaluation time of the final runs, in minutes (a rerun that reuses
    finished runs keeps their times)."""
    return sum(r["train_s"] + r["eval_s"] for f in res["final"].values()
               for runs in f["runs"].values() for r in runs) / 60


def markdown(res: dict, figure: str | None) -> str:
    st = res["study"]
    lines = ["# The study: region-aware training against the global-only baseline", "",
             budget_line(res), "",
             *split_lines(res), "",
             f"Resampling: {st['resampling']}.", "",
             f"Training + evaluation time of the final runs, summed: {run_minutes(res):.0f} min "
             "(a shared, loaded CPU: not a speed figure).", "",
             "## Verdicts (test split; region-aware minus global-only)", "", *verdict_grid(res), "",
             "## Tables", "", *final_md(res),
             "## Oracle boxes (apart)", "", *oracle_md(res),
             "## Lever selection (validation split carved out of the training data)", "",
             *selection_md(res),
             "## Loss curves", "",
             (f"![loss curves]({figure})" if figure else FIGURE_MISSING + "."), ""]
    return "\n".join(lines) + "\n"


def plot_curves(res: dict, path: pathlib.Path) -> bool:
    """Global loss (seed mean, min-max band) of both variants per dataset, the region-aware
    run's region and fused losses, stage boundaries and the modality plateau."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dss = list(res["final"])
    fig, axes = plt.subplots(1, len(dss), figsize=(5.5 * len(dss), 4), squeeze=False)
    for ax, ds in zip(axes[0], dss):
        f = res["final"][ds]
        labelled: set[str] = set()
        for variant, color in ((REGION, "tab:blue"), (BASELINE, "tab:orange")):
            x0 = 0
            for si, st in enumerate(f["curves"][variant]["stages"]):
                xs = list(range(x0 + 1, x0 + st["steps"] + 1))
                per = st["global_per_seed"]
                mean = [statistics.fmean(p[j] for p in per) for j in range(st["steps"])]
                ax.plot(xs, mean, color=color, lw=1, label=f"{variant}: global" if si == 0 else None)
                ax.fill_between(xs, [min(p[j] for p in per) for j in range(st["steps"])],
                                [max(p[j] for p in per) for j in range(st["steps"])],
                                color=color, alpha=0.15, lw=0)
                if variant == REGION:
                    for k, ls, c in (("region", "--", "tab:green"), ("fused", ":", "tab:purple")):
                        if k in st["parts_mean"]:
                            ax.plot(xs, st["parts_mean"][k], color=c, ls=ls, lw=1,
                                    label=None if k in labelled else f"{variant}: {k} loss")
                            labelled.add(k)
                    if si:
                        ax.axvline(x0 + 0.5, color="grey", ls=":", lw=1)
                x0 += st["steps"]
        ax.axhline(f["plateau"]["loss"], color="black", ls="--", lw=0.8,
                   label=f"modality plateau ln({f['plateau']['batch_size']}/{f['plateau']['modalities']})")
        ax.set_title(f"{ds} ({len(f['curves'][REGION]['seeds'])} seeds)", fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def write_report(res: dict, folder: pathlib.Path) -> list[pathlib.Path]:
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fig = folder / CURVES_PNG
    has_fig = plot_curves(res, fig)
    if not has_fig:
        print(FIGURE_MISSING, flush=True)
    md = folder / "study.md"
    md.write_text(markdown(res, CURVES_PNG if has_fig else None))
    return [md] + ([fig] if has_fig else [])


def summary_lines(res: dict) -> list[str]:
    """What the study prints at the end: one line per dataset x metric x row."""
    out = [f"study: {budget_line(res)}"]
    for ds, f in res["final"].items():
        for c in f["comparisons"]:
            out.append(f"  {ds}: {c['label']}, {c['model_a']} - {c['model_b']} = {interval(c)} points over "
                       f"{c['n_seeds']} seeds x {c['n_items']} test items: {c['verdict']}")
    return out


def levers_sentence(res: dict) -> str:
    """Which lever groups were chosen on val, from the results (none: the default setting)."""
    sel = res["selection"]
    groups = [] if "skipped" in sel else next(iter(sel["per_dataset"].values()))["groups"]
    if not groups:
        return "No lever was selected: every dataset ran the default setting"
    return ("Levers chosen per dataset on a validation split carved out of the training data: "
            + ", ".join(g["title"] for g in groups))


def readme_paragraph(res: dict) -> str:
    """The README's summary of the study, from its results JSON."""
    st = res["study"]
    b = st["budget"]
    parts = []
    for ds, f in res["final"].items():
        found = [f"{c['label']} ({ROW_NAMES[c['row']]}) {c['verdict']}, {interval(c)}"
                 for c in f["comparisons"] if c["verdict"] in (HELPS, HURTS)]
        n = len(f["comparisons"])
        parts.append(f"**{ds}**: " + ("; ".join(found) + f"; the other {n - len(found)} of {n} "
                                      "differences cannot be told apart" if found else
                                      f"none of the {n} differences can be told apart"))
    chosen = "; ".join(f"{ds} {f['setting_name']}" for ds, f in res["final"].items())
    return (f"The study (`scripts/real_data_eval.py --budget {st['budget_name']}`, "
            f"{len(st['seeds'])} seeds per model, {b['steps']} steps per run at batch "
            f"{b['batch_size']}, {st['device']}, {augmentation_text(st)}) trains "
            "the region-aware model and the global-only baseline with the same budget on each "
            "dataset's training split and scores the held-out test split on the rows that use "
            f"no annotation. {levers_sentence(res)} ({chosen}). No region-to-global attention "
            "lever exists (the global embedding never sees a region token). Region-aware minus global-only, 95 % two-level paired "
            "bootstrap interval over seeds and test images (points): " + "; ".join(parts)
            + ". Tables, loss curves, the lever results and the oracle-box rows: "
            "[docs/evaluation.md](docs/evaluation.md).")




# ---------------------------------------------------------------- generated blocks in the docs
#: the study's results file, from which the README and docs/evaluation.md blocks are rendered
RESULTS_JSON = "docs/results/study.json"
README_BLOCK = ("<!-- study:begin (generated by `python benchmarks/run_all.py --readme-only` from "
                f"{RESULTS_JSON}; edit regionmed_fast/apps/study_report.py, not this block) -->",
                "<!-- study:end -->")
DOCS_BLOCK = ("<!-- study-tables:begin (generated by `python benchmarks/run_all.py --readme-only` "
              f"from {RESULTS_JSON}; edit regionmed_fast/apps/study_report.py, not this block) -->",
              "<!-- study-tables:end -->")


def readme_block(res: dict) -> str:
    """The README's study paragraph and verdict grid."""
    return "\n".join([readme_paragraph(res), "", *verdict_grid(res)]) + "\n"


def docs_block(res: dict) -> str:
    """docs/evaluation.md's study tables: study.md without its title, headings one level down,
    the figure linked from docs/results/."""
    md = markdown(res, "results/" + CURVES_PNG)
    body = md.split("\n", 2)[2]  # drop the title line and the blank line after it
    return "\n".join("#" + ln if ln.startswith("## ") else ln for ln in body.splitlines()) + "\n"


def replace_block(text: str, block: str, markers: tuple[str, str], where: str) -> str:
    """``text`` with the part between the two marker lines replaced by ``block``."""
    begin, end = markers
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise ValueError(f"{where}: needs exactly one '{begin[:24]}...' line followed by one "
                         f"'{end}' line")
    head, rest = text.split(begin, 1)
    return f"{head}{begin}\n{block}{end}{rest.split(end, 1)[1]}"


def update_docs(repo: str | pathlib.Path) -> list[str]:
    """Render the study blocks of README.md and docs/evaluation.md from ``RESULTS_JSON``;
    returns the files that changed (none when the results file is absent)."""
    import json

    repo = pathlib.Path(repo)
    path = repo / RESULTS_JSON
    if not path.is_file():
        return []
    res = json.loads(path.read_text())
    changed = []
    for rel, markers, render in (("README.md", README_BLOCK, readme_block),
                                 ("docs/evaluation.md", DOCS_BLOCK, docs_block)):
        f = repo / rel
        old = f.read_text()
        new = replace_block(old, render(res), markers, rel)
        if new != old:
            f.write_text(new)
            changed.append(rel)
    return changed


__all__ = ["write_report", "markdown", "summary_lines", "readme_paragraph", "plot_curves",
           "verdict_grid", "readme_block", "docs_block", "update_docs", "RESULTS_JSON"]
