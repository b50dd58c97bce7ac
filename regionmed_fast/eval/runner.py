"""``evaluate(model, data_dir, tasks=..., report_dir=None, split=...)``: embed the split once,
run the tasks on the headline rows, then the oracle-box section apart, optionally write the
report. Evaluation reads nothing from a training run but the model folder (``config.json`` +
``model.safetensors``) and imports no training code.
"""
from __future__ import annotations

import dataclasses
import logging
import pathlib
import time
from collections.abc import Sequence

import torch

from regionmed_fast.data.manifest import read_manifest, read_qa
from regionmed_fast.data.split import TEST_FRACTION, VAL_FRACTION, select_split
from regionmed_fast.model import RegionMedCLIP

from .embed import GLOBAL, PROPOSED, EvalSet, Tokenizer, embed_split, eval_mode, has_regions
from .grounding import evaluate_grounding
from .report import write_report
from .retrieval import evaluate_retrieval
from .vqa import evaluate_vqa, generate_qa
from .zeroshot import evaluate_zeroshot

log = logging.getLogger("regionmed_fast.eval")

TASKS = ("retrieval", "zeroshot", "grounding", "vqa")
ORACLE_TASKS = ("retrieval", "zeroshot", "grounding")
ORACLE_NOTE = ("oracle boxes: the annotated boxes of the test images are given to the model; "
               "rows over the images that have annotated boxes only (so box presence cannot "
               "signal the class), next to the headline rows on the same images; not comparable "
               "to a model that gets no annotation")


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


def load_model(path: str | pathlib.Path) -> RegionMedCLIP:
    """A RegionMedCLIP from a save_pretrained folder or a training run folder, in eval mode."""
    return RegionMedCLIP.from_pretrained(str(find_checkpoint(path))).eval()


def model_tokenizer(model) -> Tokenizer:
    """The tokenizer that goes with ``model``: its ``tokenize`` method or ``tokenizer`` attribute."""
    for attr in ("tokenize", "tokenizer"):
        tok = getattr(model, attr, None)
        if callable(tok):
            return tok
    raise ValueError("cannot tell which tokenizer goes with the model; pass tokenizer=")


def model_image_size(model) -> int:
    """The size to evaluate at: the size the weights were last trained at
    (``config.trained_image_size``, set by the trainer), else the vision config's."""
    cfg = getattr(model, "config", None)
    size = getattr(cfg, "trained_image_size", None) or getattr(getattr(cfg, "vision", None),
                                                               "image_size", None)
    if not isinstance(size, int):
        raise ValueError("cannot tell the model's image size; pass image_size=")
    return size


def split_settings(model, group_key: str | None = None, test_fraction: float | None = None,
                   val_fraction: float | None = None) -> dict:
    """The split rule's settings: the arguments given, else what the model's training run
    recorded (``config.json`` metadata ``"split"``), else the defaults of
    ``regionmed_fast.data.split``. ``source`` says where each came from."""
    saved = getattr(model, "pretrained_metadata", {}) or {}
    saved = saved.get("split") if isinstance(saved.get("split"), dict) else {}
    out, source = {}, {}
    for key, given, default in (("group_key", group_key, None),
                                ("test_fraction", test_fraction, TEST_FRACTION),
                                ("val_fraction", val_fraction, VAL_FRACTION)):
        if given is not None:
            out[key], source[key] = given, "argument"
        elif key in saved:
            out[key], source[key] = saved[key], "model metadata"
        else:
            out[key], source[key] = default, "default"
    return {**out, "source": source}


def _parse_tasks(tasks: str | Sequence[str]) -> list[str]:
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {list(tasks)}")
    return list(tasks)


def run_vqa(model, tokenizer: Tokenizer, data_dir, records: list[dict], eval_split: str | None,
            es: EvalSet, *, image_size: int, batch_size: int, split: dict, seed: int,
            proposer: dict | None, n_boot: int, keep_items: bool = False) -> dict:
    """Train the VQA head on the train split, score on ``eval_split`` (see vqa.py)."""
    qa = read_qa(str(data_dir))
    source = "qa.jsonl"
    if not qa:
        qa = generate_qa(records, seed=seed)
        source = ("generated from annotations (no qa.jsonl): labels, region count/kind/location/"
                  "size, view, criteria")
    if eval_split == "train":
        raise ValueError("VQA trains its head on the train split; evaluate it on another split")
    rule = {k: split[k] for k in ("group_key", "test_fraction", "val_fraction")}
    train_recs = select_split(records, "train", **rule)
    test_images = ({r["image"] for r in es.records} if eval_split not in (None, "all")
                   else {r["image"] for r in select_split(records, "test", **rule)})
    train_images = {r["image"] for r in train_recs}
    emb: dict[str, dict[str, torch.Tensor]] = {}
    if eval_split in (None, "all"):  # ``es`` holds every image: the train and test ones among them
        sets = [es]
    else:
        sets = [es] + ([embed_split(model, train_recs, image_size, batch_size, proposer=proposer)]
                       if train_recs else [])
    for s in sets:
        for row, e in s.rows().items():
            emb.setdefault(row, {}).update({r["image"]: e[i] for i, r in enumerate(s.records)})
    out = evaluate_vqa([q for q in qa if q["image"] in train_images],
                       [q for q in qa if q["image"] in test_images], emb, es.blank, model,
                       tokenizer, seed=seed, qa_source=source, n_boot=n_boot,
                       keep_items=keep_items)
    out["oracle_boxes"] = "not run: the annotated boxes answer several generated questions"
    return out


def _oracle_section(es: EvalSet, model, tokenizer, tasks, *, batch_size, chunk_size, n_boot,
                    seed, prompt_sets) -> dict:
    if es.oracle is None:
        return {"skipped": "the model has no RoI processor (global-only)"}
    idx = [i for i, has in enumerate(es.has_boxes) if has]
    if len(idx) < 2:
        return {"skipped": f"{len(idx)} image(s) of the split have annotated boxes"}
    sub = es.subset(idx)
    rows = sub.rows(oracle=True)
    out: dict = {"note": ORACLE_NOTE, "n_images": len(idx), "rows": list(rows)}
    if "retrieval" in tasks:
        out["retrieval"] = evaluate_retrieval(sub, model, tokenizer, rows, chunk_size=chunk_size,
                                              n_boot=n_boot, seed=seed, region_rows=True)
    if "zeroshot" in tasks:
        out["zeroshot"] = evaluate_zeroshot(sub, model, tokenizer, rows, prompt_sets=prompt_sets,
                                            n_boot=n_boot, seed=seed)
    if "grounding" in tasks:
        out["grounding"] = evaluate_grounding(sub, model, tokenizer, batch_size=batch_size,
                                              oracle=True)
    return out


def evaluate(model, data_dir: str | pathlib.Path, tasks: str | Sequence[str] = TASKS,
             report_dir: str | pathlib.Path | None = None, split: str | None = "test", *,
             tokenizer: Tokenizer | None = None, image_size: int | None = None,
             batch_size: int = 32, chunk_size: int = 1024, group_key: str | None = None,
             test_fraction: float | None = None, val_fraction: float | None = None,
             seed: int = 0, records: list[dict] | None = None, proposer: dict | None = None,
             prompt_sets="auto", n_boot: int = 1000, oracle: bool = True,
             items: bool = False) -> dict:
    """Evaluate ``model`` (a RegionMedCLIP, or a path to a save_pretrained / run folder) on the
    ``split`` of the dataset folder ``data_dir``; deterministic for a given model, data and seed.

    split: ``"test"``, ``"val"``, ``"train"`` or ``None``/``"all"``, chosen by the project's one
    split rule (``regionmed_fast.data.split.select_split``) with ``group_key``,
    ``test_fraction``, ``val_fraction`` (default: what the model's training run recorded, else
    the rule's defaults). tasks: any of retrieval, zeroshot, grounding, vqa. Headline rows:
    ``global`` and, for a region-aware model, ``proposed_boxes`` (``proposer``: overrides of the
    model's proposer settings); the ``oracle`` section (annotated boxes) is apart.
    ``report_dir``: write report.md, results.json, timing.json and PNG figures there.
    ``records``: pre-read manifest records (as ``read_manifest`` returns them).
    ``items``: also return ``results["items"][task]``, the per-item values of the headline rows
    (retrieval ranks, zero-shot scores, VQA correctness; tensors, never written to a report),
    which ``regionmed_fast.eval.compare`` pairs across models and training seeds.
    Returns a JSON-able dict of every number (``report_files`` lists what was written).
    """
    tasks = _parse_tasks(tasks)
    if isinstance(model, (str, pathlib.Path)):
        model = load_model(model)
    tokenizer = tokenizer or model_tokenizer(model)
    image_size = image_size or model_image_size(model)
    rule = split_settings(model, group_key, test_fraction, val_fraction)
    records = records if records is not None else read_manifest(str(data_dir))
    split = None if split == "all" else split
    eval_recs = select_split(records, split, group_key=rule["group_key"],
                             test_fraction=rule["test_fraction"], val_fraction=rule["val_fraction"])
    if not eval_recs:
        hint = (" (no record says split 'val' and the val fraction is 0: pass the trainer's "
                "--val-fraction)" if split == "val" and not rule["val_fraction"] else "")
        raise ValueError(f"{data_dir}: split {split!r} has no images{hint}")
    proposer = dict(proposer or {})
    timing: dict[str, float] = {}
    with eval_mode(model):
        t0 = time.perf_counter()
        es = embed_split(model, eval_recs, image_size, batch_size, proposer=proposer)
        timing["embed"] = time.perf_counter() - t0
        rows = es.rows()
        prop_cfg = getattr(getattr(model, "config", None), "proposer", None)
        if dataclasses.is_dataclass(prop_cfg):
            prop_cfg = {**dataclasses.asdict(prop_cfg), **proposer}
        results: dict = {
            "data_dir": str(data_dir), "split": split or "all", "split_rule": rule,
            "n_images": es.n_images, "n_regions": len(es.region_texts),
            "n_images_with_boxes": sum(es.has_boxes), "image_size": image_size,
            "region_aware": has_regions(model), "rows": list(rows),
            "proposer": prop_cfg if has_regions(model) else None, "tasks": tasks, "seed": seed,
            "n_boot": n_boot}
        runners = {
            "retrieval": lambda: evaluate_retrieval(es, model, tokenizer, rows,
                                                    chunk_size=chunk_size, n_boot=n_boot, seed=seed,
                                                    keep_items=items),
            "zeroshot": lambda: evaluate_zeroshot(es, model, tokenizer, rows,
                                                  prompt_sets=prompt_sets, n_boot=n_boot, seed=seed,
                                                  keep_items=items),
            "grounding": lambda: evaluate_grounding(es, model, tokenizer, batch_size=batch_size),
            "vqa": lambda: run_vqa(model, tokenizer, data_dir, records, split, es,
                                   image_size=image_size, batch_size=batch_size, split=rule,
                                   seed=seed, proposer=proposer, n_boot=n_boot,
                                   keep_items=items),
        }
        for t in tasks:
            t1 = time.perf_counter()
            results[t] = runners[t]()
            if isinstance(results[t], dict) and "items" in results[t]:
                results.setdefault("items", {})[t] = results[t].pop("items")
            timing[t] = time.perf_counter() - t1
            log.info("eval %s done in %.1f s", t, timing[t])
        if oracle and any(t in ORACLE_TASKS for t in tasks):
            t1 = time.perf_counter()
            results["oracle"] = _oracle_section(es, model, tokenizer, tasks, batch_size=batch_size,
                                                chunk_size=chunk_size, n_boot=n_boot, seed=seed,
                                                prompt_sets=prompt_sets)
            timing["oracle"] = time.perf_counter() - t1
    if report_dir is not None:
        per_item = results.pop("items", None)  # tensors: returned, never written to results.json
        results["report_files"] = write_report(results, es, report_dir, timing=timing)
        if per_item is not None:
            results["items"] = per_item
    # wall times vary from run to run: returned, and written to timing.json, never to
    # results.json (which the same model, data and seed reproduce exactly)
    results["timing_s"] = timing
    return results


__all__ = ["TASKS", "GLOBAL", "PROPOSED", "evaluate", "load_model", "find_checkpoint",
           "split_settings", "model_image_size", "model_tokenizer"]
