"""``evaluate(model, data_dir, tasks=..., report_dir=None, split=...)``: embed the split once,
run the tasks, optionally write the report."""
from __future__ import annotations

import logging
import pathlib
import time
from collections.abc import Sequence

import torch

from .embed import EvalSet, Tokenizer, embed_split, read_records, split_records
from .grounding import evaluate_grounding
from .retrieval import evaluate_retrieval
from .vqa import evaluate_vqa, generate_qa, read_qa
from .zeroshot import evaluate_zeroshot

log = logging.getLogger("regionmed_fast.eval")

TASKS = ("retrieval", "zeroshot", "grounding", "vqa")


def find_checkpoint(path: str | pathlib.Path) -> pathlib.Path:
    """The ``save_pretrained`` folder for ``path``: itself when it holds config.json, else (a
    training run folder) the newest sub-folder holding one, preferring ones named final/best."""
    p = pathlib.Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--model {p}: no such file or folder")
    if (p / "config.json").is_file():
        return p
    cands = [c.parent for c in p.rglob("config.json")]
    if not cands:
        raise FileNotFoundError(f"--model {p}: no config.json in it or below (not a model or run folder)")
    for name in ("final", "best"):
        named = [c for c in cands if c.name == name]
        if named:
            return max(named, key=lambda c: c.stat().st_mtime)
    return max(cands, key=lambda c: (c / "config.json").stat().st_mtime)


def run_image_size(path: str | pathlib.Path) -> int | None:
    """Image size of the last stage of the training run that wrote ``path`` (a run folder or its
    ``model/`` folder), read from ``checkpoints/last.pt``; None when there is no such run."""
    p = pathlib.Path(path)
    for run in (p, p.parent):
        ck = run / "checkpoints" / "last.pt"
        if ck.is_file():
            try:
                from regionmed_fast.train.checkpoint import load

                cfg = load(str(ck)).get("config", {})
            except Exception as e:  # an unreadable checkpoint only costs us the hint
                log.warning("%s: cannot read the run config (%s); using the model's image size", ck, e)
                return None
            stages = cfg.get("stages") or [{}]
            return int(stages[-1].get("image_size") or cfg.get("image_size"))
    return None


def load_model(path: str | pathlib.Path):
    """A RegionMedCLIP from a save_pretrained folder or a training run folder. When the folder
    belongs to a training run, ``model.eval_image_size`` is the run's last-stage image size."""
    from regionmed_fast.model import RegionMedCLIP  # imported late: the model package is optional here

    folder = find_checkpoint(path)
    model = RegionMedCLIP.from_pretrained(str(folder))
    size = run_image_size(path) or run_image_size(folder)
    if size:
        model.eval_image_size = size
    return model


def model_tokenizer(model) -> Tokenizer:
    """The tokenizer that goes with ``model``: its ``tokenize`` method or ``tokenizer`` attribute."""
    for attr in ("tokenize", "tokenizer"):
        tok = getattr(model, attr, None)
        if callable(tok):
            return tok
    raise ValueError("cannot tell which tokenizer goes with the model; pass tokenizer=")


def model_image_size(model) -> int:
    """The size to evaluate at: ``model.eval_image_size`` (set from a run), else the vision
    config's ``image_size``."""
    v = getattr(model, "eval_image_size", None)
    if isinstance(v, int):
        return v
    cfg = getattr(model, "config", None)
    for c in (getattr(cfg, "vision", None), cfg):
        v = getattr(c, "image_size", None)
        if isinstance(v, int):
            return v
        if isinstance(v, (tuple, list)) and v:
            return int(v[0])
    raise ValueError("cannot tell the model's image size; pass image_size=")


def _parse_tasks(tasks: str | Sequence[str]) -> list[str]:
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {list(tasks)}")
    return list(tasks)


def run_vqa(model, tokenizer: Tokenizer, data_dir, records: list[dict], eval_split: str | None, *,
            image_size: int, batch_size: int, group_key: str | None, seed: int,
            eval_set: EvalSet | None = None) -> dict:
    """Train the VQA head on the train split, score on ``eval_split`` (see vqa.py)."""
    qa = read_qa(data_dir)
    source = "qa.jsonl"
    if qa is None:
        qa = generate_qa(records, seed=seed)
        source = "generated from annotations (no qa.jsonl): labels, region count/kind/location/size, view, criteria"
    want = "test" if eval_split in (None, "all", "val") else eval_split
    if want == "train":
        raise ValueError("VQA trains its head on the train split; evaluate it on another split")
    train_recs = split_records(records, "train", group_key=group_key)
    test_recs = split_records(records, want, group_key=group_key)
    train_imgs = {r["image"] for r in train_recs}
    test_imgs = {r["image"] for r in test_recs}
    train_qa = [q for q in qa if q["image"] in train_imgs]
    test_qa = [q for q in qa if q["image"] in test_imgs]
    need = [r for r in records if r["image"] in train_imgs | test_imgs]
    emb: dict[str, torch.Tensor] = {}
    if eval_set is not None:
        e = eval_set.image_fused if eval_set.image_fused is not None else eval_set.image_global
        emb.update({r["image"]: e[i] for i, r in enumerate(eval_set.records)})
    rest = [r for r in need if r["image"] not in emb]
    if rest:
        es = embed_split(model, rest, tokenizer, image_size, batch_size)
        e = es.image_fused if es.image_fused is not None else es.image_global
        emb.update({r["image"]: e[i] for i, r in enumerate(rest)})
    out = evaluate_vqa(train_qa, test_qa, emb, model, tokenizer, seed=seed, qa_source=source)
    out["image_embedding"] = "region_aware" if (eval_set and eval_set.image_fused is not None) else "global"
    return out


def evaluate(model, data_dir: str | pathlib.Path, tasks: str | Sequence[str] = TASKS,
             report_dir: str | pathlib.Path | None = None, split: str | None = "test", *,
             tokenizer: Tokenizer | None = None, image_size: int | None = None, batch_size: int = 32,
             chunk_size: int = 1024, group_key: str | None = None, seed: int = 0,
             records: list[dict] | None = None) -> dict:
    """Evaluate ``model`` (a RegionMedCLIP, or a path to a save_pretrained / run folder) on the
    ``split`` of the dataset folder ``data_dir``.

    split: "test"/"val" (same thing), "train", or None/"all". Records with a ``split`` field
    follow it; others are split by SHA-1 of ``record[group_key]`` (e.g. "patient_id") or of the
    image path (30% test). tasks: any of retrieval, zeroshot, grounding, vqa (list or
    comma-separated). report_dir: write report.md, results.json and PNG figures there.
    records: pre-read manifest records (each with ``_root``), to skip re-reading.
    Returns a JSON-able dict of every number (``report_files`` lists what was written).
    """
    tasks = _parse_tasks(tasks)
    if isinstance(model, (str, pathlib.Path)):
        model = load_model(model)
    tokenizer = tokenizer or model_tokenizer(model)
    image_size = image_size or model_image_size(model)
    records = records if records is not None else read_records(data_dir)
    eval_recs = split_records(records, split, group_key=group_key)
    if not eval_recs:
        raise ValueError(f"{data_dir}: split {split!r} has no images")
    t0 = time.perf_counter()
    es = embed_split(model, eval_recs, tokenizer, image_size, batch_size)
    results: dict = {"data_dir": str(data_dir), "split": split, "n_images": es.n_images,
                     "n_regions": len(es.region_texts), "image_size": image_size,
                     "region_aware": es.image_fused is not None, "tasks": tasks,
                     "timing_s": {"embed": time.perf_counter() - t0}}
    runners = {
        "retrieval": lambda: evaluate_retrieval(es, model, tokenizer, chunk_size=chunk_size),
        "zeroshot": lambda: evaluate_zeroshot(es, model, tokenizer),
        "grounding": lambda: evaluate_grounding(es, model, tokenizer, batch_size=batch_size),
        "vqa": lambda: run_vqa(model, tokenizer, data_dir, records, split, image_size=image_size,
                               batch_size=batch_size, group_key=group_key, seed=seed, eval_set=es),
    }
    for t in tasks:
        t1 = time.perf_counter()
        results[t] = runners[t]()
        results["timing_s"][t] = time.perf_counter() - t1
        log.info("eval %s done in %.1f s", t, results["timing_s"][t])
    if report_dir is not None:
        from .report import write_report

        results["report_files"] = write_report(results, es, report_dir)
    return results
