"""Zero-shot classification with prompt ensembles, and its spread over prompt sets.

Each modality has several prompt sets (:data:`PROMPT_SETS`, disjoint wordings). A class
embedding is L2-normalise(mean over templates of the normalised embeddings of
``template.format(label=...)``) (the CLIP ensembling recipe). The headline numbers use the
ensemble of every template of every set; each set is also scored alone, and the spread of
accuracy and macro AUROC over the sets is reported (zero-shot results swing with the wording).

Each image's target is its first label that is one of the classes (its primary finding);
``accuracy_any_label`` also counts a prediction right when it is any of the image's labels.
AUROC uses the raw cosine scores, one-vs-rest per class. When some image has several labels,
``multilabel_macro_auroc`` is added. Intervals: 95 % bootstrap over images; each row minus
``global`` with a paired interval.
"""
from __future__ import annotations

import statistics
from collections.abc import Sequence

import torch

from .embed import GLOBAL, EvalSet, Tokenizer, encode_texts
from .metrics import (accuracy, balanced_accuracy, binary_auroc, bootstrap_indices,
                      confusion_matrix, difference, macro_auroc, macro_auroc_resampled,
                      mean_difference, mean_interval, percentile_interval)

PROMPT_SETS: dict[str, list[list[str]]] = {
    "chest_xray": [
        ["a chest radiograph showing {label}", "chest x-ray with {label}"],
        ["a chest x-ray of a patient with {label}", "findings consistent with {label}"],
        ["{label}", "an x-ray image of the chest: {label}"],
    ],
    "dermoscopy": [
        ["dermoscopic image of a {label}", "a dermoscopy image showing a {label}"],
        ["a skin lesion: {label}", "a close-up of a skin lesion with {label}"],
        ["{label}", "dermatoscopy: {label}"],
    ],
    "generic": [
        ["a medical image showing {label}", "an image with {label}"],
        ["findings consistent with {label}", "a scan of a patient with {label}"],
        ["{label}", "an image of {label}"],
    ],
}


def pick_prompt_sets(records: Sequence[dict]) -> str:
    """Prompt family from what the records say about their modality (``modality`` or text)."""
    blob = " ".join(str(r.get("modality", "")) + " " + r.get("text", "")[:200]
                    for r in records[:200]).lower()
    derm = "dermoscop" in blob
    chest = any(w in blob for w in ("x-ray", "xray", "radiograph", "chest"))
    if derm and not chest:
        return "dermoscopy"
    if chest and not derm:
        return "chest_xray"
    return "generic"  # neither, or a mix of modalities


def primary_labels(labels: Sequence[Sequence[str]], classes: Sequence[str] | None = None,
                   min_count: int = 1) -> tuple[list[str], list[int]]:
    """Classes (sorted; those with >= ``min_count`` primary images when not given) and, per
    image, the index of its first label among them (-1: none, the image is left out)."""
    if classes is None:
        counts: dict[str, int] = {}
        for ls in labels:
            if ls:
                counts[ls[0]] = counts.get(ls[0], 0) + 1
        classes = sorted(c for c, n in counts.items() if n >= min_count)
    pos = {c: i for i, c in enumerate(classes)}
    y = [next((pos[lab] for lab in ls if lab in pos), -1) for ls in labels]
    return list(classes), y


def _check_templates(templates: Sequence[str]) -> None:
    if not templates:
        raise ValueError("zero-shot: a prompt set has no templates")
    for t in templates:
        if "{label}" not in t:
            raise ValueError(f"template {t!r} has no {{label}} placeholder")


@torch.no_grad()
def class_embeddings(model, tokenizer: Tokenizer, classes: Sequence[str],
                     templates: Sequence[str]) -> torch.Tensor:
    """float32 [C, D]: ensembled, L2-normalised prompt embedding per class."""
    _check_templates(templates)
    prompts = [t.format(label=c) for c in classes for t in templates]
    e = encode_texts(model, tokenizer, prompts).view(len(classes), len(templates), -1)
    return torch.nn.functional.normalize(e.mean(1), dim=-1)


def _resolve_sets(records, prompt_sets) -> tuple[str, list[list[str]]]:
    if prompt_sets == "auto":
        name = pick_prompt_sets(records)
        return name, PROMPT_SETS[name]
    if isinstance(prompt_sets, str):
        if prompt_sets not in PROMPT_SETS:
            raise ValueError(f"unknown prompt family {prompt_sets!r}; known: {sorted(PROMPT_SETS)}")
        return prompt_sets, PROMPT_SETS[prompt_sets]
    sets = [[t] if isinstance(t, str) else list(t) for t in prompt_sets]
    if not sets:
        raise ValueError("zero-shot: no prompt sets given")
    for s in sets:
        _check_templates(s)
    return "custom", sets


def _scores_metrics(scores: torch.Tensor, yt: torch.Tensor, n_classes: int) -> dict:
    pred = scores.argmax(1)
    macro, per = macro_auroc(yt, scores)
    return {"accuracy": accuracy(yt, pred), "balanced_accuracy": balanced_accuracy(yt, pred, n_classes),
            "macro_auroc": macro, "per_class_auroc": per, "pred": pred}


@torch.no_grad()
def evaluate_zeroshot(es: EvalSet, model, tokenizer: Tokenizer, rows: dict[str, torch.Tensor],
                      *, classes: Sequence[str] | None = None, prompt_sets="auto",
                      min_count: int = 1, n_boot: int = 1000, seed: int = 0,
                      keep_items: bool = False) -> dict:
    """Zero-shot numbers for every row of image embeddings (``rows``: name -> [N, D]).

    ``prompt_sets``: ``"auto"`` (from the records' modality), a family name of
    :data:`PROMPT_SETS`, or a list of prompt sets (each a list of ``{label}`` templates).
    Returns ``by_embedding[row]`` (ensemble: accuracy, balanced accuracy, macro AUROC, with
    ``_ci95`` intervals, per-class AUROC, confusion matrix; ``per_prompt_set`` metrics and
    their ``prompt_spread``), ``differences`` (rows minus ``global``), class support and a
    majority-class baseline. ``keep_items``: also ``items`` (not JSON): the targets ``y`` int64
    [n], each row's cosine ``scores`` float [n, C] and the image keys, for comparisons across
    models (``regionmed_fast.eval.compare``).
    """
    family, sets = _resolve_sets(es.records, prompt_sets)
    classes, y = primary_labels(es.labels, classes, min_count)
    if len(classes) < 2:
        return {"skipped": f"needs >= 2 classes, found {classes}"}
    keep = torch.tensor([i for i, c in enumerate(y) if c >= 0], dtype=torch.long)
    yt = torch.tensor([y[i] for i in keep.tolist()], dtype=torch.long)
    ensemble = [t for s in sets for t in s]
    cemb = class_embeddings(model, tokenizer, classes, ensemble)
    set_embs = [class_embeddings(model, tokenizer, classes, s) for s in sets]
    label_sets = [set(es.labels[i]) for i in keep.tolist()]
    support = torch.bincount(yt, minlength=len(classes)).tolist()
    res: dict = {"classes": classes, "prompt_family": family, "prompt_sets": sets,
                 "n_images": int(keep.numel()), "n_left_out": es.n_images - int(keep.numel()),
                 "support": support, "rows": list(rows), "by_embedding": {},
                 # always answering the most frequent class: what an accuracy must beat
                 "majority_baseline": {"accuracy": max(support) / max(len(yt), 1),
                                       "balanced_accuracy": 1 / max(sum(1 for c in support if c), 1)}}
    idx = bootstrap_indices(len(yt), n_boot, seed)
    per_row, row_scores = {}, {}
    for row, emb in rows.items():
        scores = emb[keep] @ cemb.T
        row_scores[row] = scores
        boot_auroc = macro_auroc_resampled(yt, scores, idx)
        m = _scores_metrics(scores, yt, len(classes))
        pred = m.pop("pred")
        correct = (pred == yt).double()
        r = {**m, "per_class_auroc": dict(zip(classes, m["per_class_auroc"])),
             "accuracy_ci95": mean_interval(correct, idx),
             "macro_auroc_ci95": percentile_interval(boot_auroc),
             "accuracy_any_label": sum(classes[p] in s for p, s in zip(pred.tolist(), label_sets))
             / max(len(label_sets), 1),
             "confusion_matrix": confusion_matrix(yt, pred, len(classes)).tolist()}
        per_set = []
        for s, e in zip(sets, set_embs):
            ms = _scores_metrics(emb[keep] @ e.T, yt, len(classes))
            per_set.append({"templates": s, "accuracy": ms["accuracy"],
                            "macro_auroc": ms["macro_auroc"]})
        r["per_prompt_set"] = per_set
        r["prompt_spread"] = {k: _spread([p[k] for p in per_set])
                              for k in ("accuracy", "macro_auroc")}
        if any(len(ls) > 1 for ls in es.labels):
            all_scores = emb @ cemb.T
            per_ml = [binary_auroc(torch.tensor([c in ls for ls in es.labels]), all_scores[:, j])
                      for j, c in enumerate(classes)]
            ok = [a for a in per_ml if a == a]
            r["multilabel_macro_auroc"] = sum(ok) / len(ok) if ok else float("nan")
        res["by_embedding"][row] = r
        per_row[row] = (correct, r["macro_auroc"], boot_auroc)
    if GLOBAL in rows and len(rows) > 1:
        res["differences"] = _differences(per_row, idx)
    if keep_items:
        res["items"] = {"y": yt, "scores": row_scores,
                        "image_keys": [es.records[i]["image"] for i in keep.tolist()]}
    return res


def _spread(values: list[float]) -> dict:
    ok = [v for v in values if v == v]
    if not ok:
        return {"min": float("nan"), "max": float("nan"), "std": float("nan")}
    return {"min": min(ok), "max": max(ok), "std": statistics.stdev(ok) if len(ok) > 1 else 0.0}


def _differences(per_row: dict[str, tuple], idx: torch.Tensor) -> list[dict]:
    """Each row minus ``global``: accuracy (paired over images) and macro AUROC (the same
    resamples for both rows)."""
    out = []
    g_correct, g_auroc, g_boot = per_row[GLOBAL]
    for row, (correct, auroc, boot) in per_row.items():
        if row == GLOBAL:
            continue
        out.append({"metric": "accuracy", "a": row, "b": GLOBAL,
                    **mean_difference(correct, g_correct, idx)})
        out.append({"metric": "macro AUROC", "a": row, "b": GLOBAL,
                    **difference(auroc - g_auroc, boot - g_boot)})
    return out
