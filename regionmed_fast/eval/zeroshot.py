"""Zero-shot classification with prompt-template ensembles, global vs region-aware embeddings.

Class prompt embedding = L2-normalise(mean over templates of the normalised embeddings of
``template.format(label=...)``) (the CLIP ensembling recipe). Each image's target is its first
label that is one of the classes (its primary finding); ``accuracy_any`` also counts a
prediction right when it is any of the image's labels. AUROC uses the raw cosine scores,
one-vs-rest per class. When some image has several labels, ``multilabel_macro_auroc`` is added:
per class, AUROC of its score for "the class is among the image's labels" over all images.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .embed import EvalSet, Tokenizer, encode_texts
from .metrics import accuracy, balanced_accuracy, binary_auroc, confusion_matrix, macro_auroc
from .retrieval import image_embeddings

TEMPLATES: dict[str, list[str]] = {
    "chest_xray": [
        "a chest radiograph showing {label}",
        "chest x-ray with {label}",
        "a chest x-ray of a patient with {label}",
        "findings consistent with {label}",
        "{label}",
    ],
    "dermoscopy": [
        "dermoscopic image of a {label}",
        "a dermoscopy image showing a {label}",
        "a skin lesion: {label}",
        "{label}",
    ],
    "generic": [
        "a medical image showing {label}",
        "an image with {label}",
        "findings consistent with {label}",
        "{label}",
    ],
}


def pick_templates(records: Sequence[dict]) -> str:
    """Template set from what the records say about their modality (meta ``modality`` or text)."""
    blob = " ".join(str(r.get("modality", "")) + " " + r.get("text", "")[:200] for r in records[:200]).lower()
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
    y = [next((pos[l] for l in ls if l in pos), -1) for ls in labels]
    return list(classes), y


@torch.no_grad()
def class_embeddings(model, tokenizer: Tokenizer, classes: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """float32 [C, D]: ensembled, L2-normalised prompt embedding per class."""
    if not templates:
        raise ValueError("class_embeddings: no templates")
    for t in templates:
        if "{label}" not in t:
            raise ValueError(f"template {t!r} has no {{label}} placeholder")
    prompts = [t.format(label=c) for c in classes for t in templates]
    e = encode_texts(model, tokenizer, prompts).view(len(classes), len(templates), -1)
    return torch.nn.functional.normalize(e.mean(1), dim=-1)


@torch.no_grad()
def evaluate_zeroshot(es: EvalSet, model, tokenizer: Tokenizer, *, classes: Sequence[str] | None = None,
                      templates: str | Sequence[str] = "auto", min_count: int = 1) -> dict:
    """Accuracy, balanced accuracy, macro AUROC and confusion matrix per image embedding kind."""
    tname = pick_templates(es.records) if templates == "auto" else (templates if isinstance(templates, str) else "custom")
    tlist = TEMPLATES[tname] if isinstance(templates, str) else list(templates)
    if isinstance(templates, str) and templates != "auto" and templates not in TEMPLATES:
        raise ValueError(f"unknown template set {templates!r}; known: {sorted(TEMPLATES)}")
    classes, y = primary_labels(es.labels, classes, min_count)
    if len(classes) < 2:
        return {"skipped": f"needs >= 2 classes, found {classes}"}
    keep = torch.tensor([i for i, c in enumerate(y) if c >= 0], dtype=torch.long)
    yt = torch.tensor([y[i] for i in keep.tolist()], dtype=torch.long)
    cemb = class_embeddings(model, tokenizer, classes, tlist)
    label_sets = [set(es.labels[i]) for i in keep.tolist()]
    res: dict = {"classes": classes, "templates": tlist, "template_set": tname,
                 "n_images": int(keep.numel()), "n_left_out": es.n_images - int(keep.numel()),
                 "support": torch.bincount(yt, minlength=len(classes)).tolist(), "by_embedding": {}}
    # always answering the most frequent class: what an accuracy must beat on imbalanced sets
    res["majority_baseline"] = {"accuracy": max(res["support"]) / max(len(yt), 1),
                                "balanced_accuracy": 1 / max(sum(1 for c in res["support"] if c), 1)}
    for kind, emb in image_embeddings(es).items():
        scores = emb[keep] @ cemb.T
        pred = scores.argmax(1)
        macro, per = macro_auroc(yt, scores)
        res["by_embedding"][kind] = {
            "accuracy": accuracy(yt, pred),
            "accuracy_any_label": sum(classes[p] in s for p, s in zip(pred.tolist(), label_sets)) / max(len(label_sets), 1),
            "balanced_accuracy": balanced_accuracy(yt, pred, len(classes)),
            "macro_auroc": macro,
            "per_class_auroc": dict(zip(classes, per)),
            "confusion_matrix": confusion_matrix(yt, pred, len(classes)).tolist(),
        }
        if any(len(ls) > 1 for ls in es.labels):
            all_scores = emb @ cemb.T
            per_ml = [binary_auroc(torch.tensor([c in ls for ls in es.labels]), all_scores[:, j])
                      for j, c in enumerate(classes)]
            ok = [a for a in per_ml if a == a]
            res["by_embedding"][kind]["multilabel_macro_auroc"] = sum(ok) / len(ok) if ok else float("nan")
    return res
