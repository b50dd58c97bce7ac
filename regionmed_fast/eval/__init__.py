"""Evaluation: retrieval, zero-shot classification, region grounding, VQA, with reports.

``evaluate(model, data_dir, tasks=..., report_dir=None, split="test")`` runs them on the headline
rows (``global``; ``proposed_boxes`` for region-aware models) and the oracle-box rows apart;
the ``regionmed-fast eval`` command wraps it. Metric definitions are in ``metrics.py``, paired
comparisons of two training recipes over seeds in ``compare.py``, the protocol in
docs/evaluation.md. Symbols are re-exported lazily, like ``ops``, ``nn``, ``data`` and ``model``.
"""
from __future__ import annotations

from regionmed_fast._lazy import lazy_getattr

_EXPORTS = {
    **dict.fromkeys(["GLOBAL", "ORACLE", "PROPOSED", "EvalSet", "embed_split"],
                    "regionmed_fast.eval.embed"),
    **dict.fromkeys(["accuracy", "balanced_accuracy", "binary_auroc", "confusion_matrix",
                     "dedup_texts", "macro_auroc", "median_rank", "recall_at_k", "retrieval_ranks",
                     "topk_chunked"], "regionmed_fast.eval.metrics"),
    **dict.fromkeys(["TASKS", "evaluate", "load_model", "split_settings"],
                    "regionmed_fast.eval.runner"),
    **dict.fromkeys(["paired_seed_difference", "seed_verdict"], "regionmed_fast.eval.compare"),
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr("regionmed_fast.eval", _EXPORTS)
