"""VQA with frozen encoders: a small head classifies the answer over the training answer
vocabulary from [image embedding, question embedding, their product].

Protocol: the head (2-layer MLP) is trained on the train split's QA pairs with AdamW,
full batch, fixed seed and epochs; the encoders stay frozen (embeddings are computed once).
Answers not seen in training count as wrong. Closed questions are those whose answer is
"yes" or "no"; open are the rest; both are reported apart. Next to every number:

* the **blank-image control**: the same head trained and scored with the embedding of a blank
  image in place of every image (the same row's embedding of the normalisation's mean colour):
  what the question alone gives;
* the **question-prior baseline**: the most frequent training answer for the same question.

Which image embedding feeds the head is the row name (``global``, ``proposed_boxes``). No row
uses the annotated boxes: they would answer several generated questions (count, location).

QA source: ``qa.jsonl`` lines ``{"image", "question", "answer"}`` when the data folder has one;
otherwise QA pairs generated from the annotations by :func:`generate_qa` (``qa_source`` says so).
"""
from __future__ import annotations

import contextlib
import random
from collections import Counter
from collections.abc import Sequence

import torch

from .embed import Tokenizer, encode_texts
from .metrics import bootstrap_indices, mean_difference, mean_interval

CLOSED = {"yes", "no"}


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
    vocab = sorted({lab for r in records for lab in r.get("labels", [])})
    sizes = sorted(g["size_mm"] for r in records for g in r.get("regions", [])
                   if isinstance(g.get("size_mm"), (int, float)))
    thr = sizes[len(sizes) // 2] if sizes else None
    out: list[dict] = []

    def add(r, q, a):
        out.append({"image": r["image"], "question": q, "answer": _norm_answer(a)})

    for r in records:
        labels = list(r.get("labels", []))
        if labels:
            add(r, f"is there {rng.choice(labels)} in this image?", "yes")
            absent = [lab for lab in vocab if lab not in labels]
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
                add(r, f"is the {kind} in the {loc} larger than {thr:g} mm?",
                    "yes" if g["size_mm"] > thr else "no")
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


@contextlib.contextmanager
def _one_thread():
    # the head's matrices are a few hundred rows by a few hundred columns: one thread is the
    # fastest setting for them, and on a loaded machine a thread pool's barriers cost 10-20x
    # (docs/evaluation.md)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _train_head(xi, xq, y, n_answers, *, epochs, lr, seed) -> _Head:
    # the whole fit under its own seeded RNG (init, shuffles, dropout): the same inputs give
    # the same head whatever ran before in the process
    with torch.random.fork_rng(), torch.enable_grad(), _one_thread():
        torch.manual_seed(seed)
        head = _Head(xi.shape[1], n_answers)
        opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-2)
        head.train()
        for _ in range(epochs):
            perm = torch.randperm(len(y))
            loss = torch.nn.functional.cross_entropy(head(xi[perm], xq[perm]), y[perm])
            opt.zero_grad()
            loss.backward()
            opt.step()
    head.eval()
    head.final_loss = float(loss.detach())
    return head


def _split_acc(correct: torch.Tensor, closed: torch.Tensor, idx: torch.Tensor) -> dict:
    def acc(mask):
        return float(correct[mask].mean()) if bool(mask.any()) else None
    return {"accuracy": acc(torch.ones_like(closed)), "accuracy_ci95": mean_interval(correct, idx),
            "closed_accuracy": acc(closed), "open_accuracy": acc(~closed)}


@torch.no_grad()
def evaluate_vqa(train_qa: Sequence[dict], test_qa: Sequence[dict],
                 image_emb: dict[str, dict[str, torch.Tensor]], blank: dict[str, torch.Tensor],
                 model, tokenizer: Tokenizer, *, epochs: int = 150, lr: float = 3e-3,
                 seed: int = 0, qa_source: str = "qa.jsonl", n_boot: int = 1000,
                 keep_items: bool = False) -> dict:
    """Train a head per row on ``train_qa`` and score ``test_qa``.

    ``image_emb``: row name -> {image path (the manifest ``image`` field) -> float32 [D]};
    ``blank``: row name -> [D], that row's embedding of a blank image (the control). QA pairs
    whose image is missing raise an error naming it. Returns per row ``by_embedding[row]``
    (accuracy with ``accuracy_ci95``, closed/open accuracy, ``blank_image_control`` and
    ``minus_blank`` (paired interval)), ``differences`` of rows, the question prior.
    ``keep_items``: also ``items`` (not JSON): per row the 0/1 ``correct`` float64 [Q] and its
    ``blank_correct``, with the question keys, for comparisons across models.
    """
    for name, qa in (("train", train_qa), ("test", test_qa)):
        if not qa:
            return {"skipped": f"no {name} QA pairs", "qa_source": qa_source}
    rows = list(image_emb)
    for row in rows:
        for name, qa in (("train", train_qa), ("test", test_qa)):
            missing = [q["image"] for q in qa if q["image"] not in image_emb[row]]
            if missing:
                raise ValueError(f"{name} QA names images not in the data set, e.g. {missing[0]!r}")
    answers = sorted({_norm_answer(q["answer"]) for q in train_qa})
    aid = {a: i for i, a in enumerate(answers)}
    questions = sorted({q["question"] for q in list(train_qa) + list(test_qa)})
    qemb_u = encode_texts(model, tokenizer, questions)
    qpos = {q: i for i, q in enumerate(questions)}

    def qfeats(qa):
        return qemb_u[torch.tensor([qpos[q["question"]] for q in qa])]

    y = torch.tensor([aid[_norm_answer(q["answer"])] for q in train_qa])
    gold = [_norm_answer(q["answer"]) for q in test_qa]
    gold_id = torch.tensor([aid.get(a, -1) for a in gold])
    closed = torch.tensor([a in CLOSED for a in gold])
    xq, tq = qfeats(train_qa), qfeats(test_qa)
    idx = bootstrap_indices(len(test_qa), n_boot, seed)

    def fit_and_score(train_img, test_img):
        head = _train_head(train_img, xq, y, len(answers), epochs=epochs, lr=lr, seed=seed)
        with _one_thread():
            correct = (head(test_img, tq).argmax(1) == gold_id).double()
        return correct, head.final_loss

    res: dict = {"qa_source": qa_source, "rows": rows, "by_embedding": {},
                 "protocol": (f"frozen encoders; MLP head (hidden 128) on [img, q, img*q] trained "
                              f"on {len(train_qa)} train QA pairs ({epochs} full-batch AdamW epochs, "
                              f"lr {lr}, seed {seed}); answer classification over {len(answers)} "
                              "training answers; closed = yes/no answers; control: the same head "
                              "with a blank image's embedding for every image"),
                 "n_train": len(train_qa), "n_test": len(test_qa), "n_answers": len(answers),
                 "n_closed": int(closed.sum()), "n_open": int((~closed).sum())}
    correct_of, blank_of = {}, {}
    for row in rows:
        emb = image_emb[row]
        xi = torch.stack([emb[q["image"]] for q in train_qa]).float()
        ti = torch.stack([emb[q["image"]] for q in test_qa]).float()
        correct, loss = fit_and_score(xi, ti)
        blank_correct, _ = fit_and_score(blank[row].float().expand_as(xi),
                                         blank[row].float().expand_as(ti))
        correct_of[row], blank_of[row] = correct, blank_correct
        r = _split_acc(correct, closed, idx)
        r["final_train_loss"] = loss
        r["blank_image_control"] = _split_acc(blank_correct, closed, idx)
        r["minus_blank"] = mean_difference(correct, blank_correct, idx)
        res["by_embedding"][row] = r
    if len(rows) > 1:
        base = rows[0]
        res["differences"] = [
            {"metric": "accuracy", "a": row, "b": base,
             **mean_difference(correct_of[row], correct_of[base], idx)}
            for row in rows[1:]]
    by_q: dict[str, Counter] = {}
    for q in train_qa:
        by_q.setdefault(q["question"], Counter())[_norm_answer(q["answer"])] += 1
    overall = Counter(_norm_answer(q["answer"]) for q in train_qa).most_common(1)[0][0]
    prior = [by_q[q["question"]].most_common(1)[0][0] if q["question"] in by_q else overall
             for q in test_qa]
    res["prior_baseline"] = _split_acc(
        torch.tensor([p == g for p, g in zip(prior, gold)], dtype=torch.float64), closed, idx)
    if keep_items:
        res["items"] = {"correct": correct_of, "blank_correct": blank_of,
                        "keys": [f"{q['image']}\t{q['question']}" for q in test_qa]}
    return res
