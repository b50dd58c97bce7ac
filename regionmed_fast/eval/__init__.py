"""Evaluation: retrieval, zero-shot classification, region grounding, VQA, with reports.

``evaluate(model, data_dir, tasks=..., report_dir=None, split="test")`` runs them on the headline
rows (``global``; ``proposed_boxes`` for region-aware models) and the oracle-box rows apart;
the ``regionmed-fast eval`` command wraps it. Metric definitions are in ``metrics.py``, the
protocol in docs/evaluation.md.
"""
from .embed import GLOBAL, ORACLE, PROPOSED, EvalSet, embed_split
from .metrics import (accuracy, balanced_accuracy, binary_auroc, confusion_matrix, dedup_texts,
                      macro_auroc, median_rank, recall_at_k, retrieval_ranks, topk_chunked)
from .runner import TASKS, evaluate, load_model, split_settings

__all__ = ["evaluate", "load_model", "split_settings", "embed_split", "EvalSet", "TASKS",
           "GLOBAL", "PROPOSED", "ORACLE", "retrieval_ranks", "topk_chunked", "recall_at_k",
           "median_rank", "dedup_texts", "accuracy", "balanced_accuracy", "macro_auroc",
           "binary_auroc", "confusion_matrix"]
