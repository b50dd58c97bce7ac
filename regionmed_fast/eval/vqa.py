"""VQA with frozen encoders: a small head classifies the answer over the training answer
vocabulary from [image embedding, question embedding, their product].

Protocol: the head (2-layer MLP) is trained on the train split's QA pairs with AdamW,
full batch, fixed seed and epochs; the encoders stay frozen (embeddings are computed once).
Answers not seen in training count as wrong. Closed questions are those whose answer is
"yes" or "no"; open are the rest; both are reported apart, next to a question-prior baseline
(the most frequent training answer for the same question text, else the overall most frequent).

QA source: ``qa.jsonl`` lines ``{"image", "question", "answer"[, "split"]}`` when the data folder
has one; otherwise QA pairs generated from the annotations by ``generate_qa`` (and the result
says so in ``qa_source``).
"""
from __future__ import annotations

import json
import pathlib
import random
from collections import Counter
from collections.abc import Sequence

import torch

from .embed import Tokenizer, encode_texts

CLOSED = {"yes", "no"}


def read_qa(data_dir: str | pathlib.Path) -> list[dict] | None:
    """Lines of ``qa.jsonl`` or None when the folder has none; errors name file:line."""
    path = pathlib.Path(data_dir) / "qa.jsonl"
    if not path.is_file():
        return None
    out = []
    for ln, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            q = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{ln}: not JSON ({e})") from None
        for key in ("image", "question", "answer"):
            if not isinstance(q.get(key), str):
                raise ValueError(f"{path}:{ln}: field {key!r} missing or not a string")
        out.append(q)
    return out


def _norm_answer(a) -> str:
    return str(a).strip().lower()


def generate_qa(records: Sequence[dict], seed: int = 0) -> list[dict]:
    """QA pairs from annotations, per image:

    * closed "is there {label} in this image?" for one of its labels (yes) and one label of the
      vocabulary it lacks (no);  open "what is the main finding?" -> first label;
    * open "how many annotated regions are there?" -> count;
    * regions with ``kind`` and ``location`` (synthetic phantoms): "what kind of finding is in
      the {location}?" -> kind, "where is the {kind}?" -> location (kind unique in the image);
      with ``size_mm``: "is the {kind} in the {location} larger than {t} mm?" with t the median
      size of the data set;
    * structured fields when present: ``view`` ("which view is this image?") and each entry of a
      ``criteria`` dict ("what is the {criterion}?").
    """
    rng = random.Random(seed)
    vocab = sorted({l for r in records for l in r.get("labels", [])})
    sizes = sorted(g["size_mm"] for r in records for g in r.get("regions", []) if isinstance(g.get("size_mm"), (int, float)))
    thr = sizes[len(sizes) // 2] if sizes else None
    out: list[dict] = []

    def add(r, q, a):
        out.append({"image": r["image"], "question": q, "answer": _norm_answer(a)})

    for r in records:
        labels = list(r.get("labels", []))
        if labels:
            add(r, f"is there {rng.choice(labels)} in this image?", "yes")
            absent = [l for l in vocab if l not in labels]
            if absent:
                add(r, f"is there {rng.choice(absent)} in this image?", "no")
            add(r, "what is the main finding?", labels[0])
        regions = r.get("regions", [])
        add(r, "how many annotated regions are there?", len(regions))
        kinds = Counter(g.get("kind") for g in regions)
        for g in regions:
            kind, loc = g.get("kind"), g.get("location")
            if not (isinstance(kind, str) and isinstance(loc, str)):
                continue
            add(r, f"what kind of finding is in the {loc}?", kind)
            if kinds[kind] == 1:
                add(r, f"where is the {kind}?", loc)
            if thr is not None and isinstance(g.get("size_mm"), (int, float)):
                add(r, f"is the {kind} in the {loc} larger than {thr:g} mm?", "yes" if g["size_mm"] > thr else "no")
        if isinstance(r.get("view"), str) and r["view"]:
            add(r, "which view is this image?", r["view"])
        if isinstance(r.get("criteria"), dict):
            for k, v in sorted(r["criteria"].items()):
                add(r, f"what is the {k.replace('_', ' ')}?", v)
    return out


class _Head(torch.nn.Module):
    def __init__(self, d: int, n_answers: int, hidden: int = 128):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(3 * d, hidden), torch.nn.GELU(),
                                       torch.nn.Dropout(0.1), torch.nn.Linear(hidden, n_answers))

    def forward(self, img: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([img, q, img * q], dim=-1))


def _acc(pred: list[str], gold: list[str], mask: list[bool]) -> float | None:
    sel = [p == g for p, g, m in zip(pred, gold, mask) if m]
    return sum(sel) / len(sel) if sel else None


def evaluate_vqa(train_qa: Sequence[dict], test_qa: Sequence[dict], image_emb: dict[str, torch.Tensor],
                 model, tokenizer: Tokenizer, *, epochs: int = 150, lr: float = 3e-3, seed: int = 0,
                 qa_source: str = "qa.jsonl") -> dict:
    """Train the head on ``train_qa`` and score ``test_qa``.

    image_emb: image path (the manifest ``image`` field) -> float32 [D] frozen embedding; QA
    pairs whose image is missing there raise an error naming it.
    """
    for name, qa in (("train", train_qa), ("test", test_qa)):
        if not qa:
            return {"skipped": f"no {name} QA pairs", "qa_source": qa_source}
        missing = [q["image"] for q in qa if q["image"] not in image_emb]
        if missing:
            raise ValueError(f"{name} QA names images not in the data set, e.g. {missing[0]!r}")
    answers = sorted({_norm_answer(q["answer"]) for q in train_qa})
    aid = {a: i for i, a in enumerate(answers)}
    questions = sorted({q["question"] for q in list(train_qa) + list(test_qa)})
    qemb_u = encode_texts(model, tokenizer, questions)
    qpos = {q: i for i, q in enumerate(questions)}

    def feats(qa):
        img = torch.stack([image_emb[q["image"]] for q in qa]).float()
        qe = qemb_u[torch.tensor([qpos[q["question"]] for q in qa])]
        return img, qe

    xi, xq = feats(train_qa)
    y = torch.tensor([aid[_norm_answer(q["answer"])] for q in train_qa])
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        head = _Head(xi.shape[1], len(answers))
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-2)
    head.train()
    with torch.enable_grad():
        for _ in range(epochs):
            perm = torch.randperm(len(y), generator=g)
            loss = torch.nn.functional.cross_entropy(head(xi[perm], xq[perm]), y[perm])
            opt.zero_grad()
            loss.backward()
            opt.step()
    head.eval()
    ti, tq = feats(test_qa)
    with torch.no_grad():
        pred = [answers[i] for i in head(ti, tq).argmax(1).tolist()]
    gold = [_norm_answer(q["answer"]) for q in test_qa]
    closed = [a in CLOSED for a in gold]
    opened = [not c for c in closed]

    by_q: dict[str, Counter] = {}
    for q in train_qa:
        by_q.setdefault(q["question"], Counter())[_norm_answer(q["answer"])] += 1
    overall = Counter(_norm_answer(q["answer"]) for q in train_qa).most_common(1)[0][0]
    prior = [by_q[q["question"]].most_common(1)[0][0] if q["question"] in by_q else overall for q in test_qa]
    allm = [True] * len(gold)
    return {
        "qa_source": qa_source,
        "protocol": (f"frozen encoders; MLP head (hidden {head.net[0].out_features}) on [img, q, img*q] trained on {len(train_qa)} train QA pairs "
                     f"({epochs} full-batch AdamW epochs, lr {lr}, seed {seed}); answer classification over "
                     f"{len(answers)} training answers; closed = yes/no answers"),
        "n_train": len(train_qa), "n_test": len(test_qa), "n_answers": len(answers),
        "n_closed": sum(closed), "n_open": sum(opened),
        "accuracy": _acc(pred, gold, allm), "closed_accuracy": _acc(pred, gold, closed),
        "open_accuracy": _acc(pred, gold, opened),
        "prior_baseline": {"accuracy": _acc(prior, gold, allm), "closed_accuracy": _acc(prior, gold, closed),
                           "open_accuracy": _acc(prior, gold, opened)},
        "final_train_loss": float(loss.detach()),
    }
