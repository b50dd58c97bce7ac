"""RegionMedCLIP: image tower + text tower + RoI processor + region proposer, CLIP projections.

Embeddings live in one ``embed_dim`` space: the global image embedding, the region-aware image
embedding, each region's embedding (all through ``image_proj``), and text embeddings (through
``text_proj``). The losses live in the trainer (``regionmed_fast.ops.chunked_clip_loss``).
Persistence is in ``persistence.py`` (safetensors + JSON, no pickle), the frozen-text cache in
``text_cache.py``, the annotation-free region proposer in ``proposer.py``.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import persistence
from .config import RegionMedConfig
from .proposer import ProposerConfig, patch_saliency, propose_from_saliency
from .roi_processor import RoIProcessor, boxes_to_rois
from .text import Tokenizer, TextEncoder
from .text_cache import TextFeatureCache
from .vit import build_vision

AUTO = "auto"


class ImageFeatures(NamedTuple):
    """The image tower's output for one batch, reusable by every ``encode_*`` call:
    ``pooled`` [B, C], ``grid`` [B, h, w, C] (tower width, not projected), ``image_hw`` the
    pixel size (H, W) of the images."""
    pooled: torch.Tensor
    grid: torch.Tensor
    image_hw: tuple[int, int]


class RegionMedCLIP(nn.Module):
    """Region-aware medical CLIP (arXiv 2508.05244), lean.

    Submodules (names used for freezing): ``visual``, ``text``, ``roi`` (absent when
    ``config.use_roi`` is False), ``image_proj``, ``text_proj``; parameters ``logit_scale``
    and optionally ``logit_bias``.
    """

    def __init__(self, config: RegionMedConfig, *, load_text_weights: bool = True) -> None:
        super().__init__()
        self.config = config
        self.visual = build_vision(config.vision)
        self.text = TextEncoder(config.text, load_weights=load_text_weights)
        vw = self.visual.width
        self.image_proj = nn.Linear(vw, config.embed_dim, bias=False)
        self.text_proj = nn.Linear(self.text.width, config.embed_dim, bias=False)
        nn.init.normal_(self.image_proj.weight, std=vw ** -0.5)
        nn.init.normal_(self.text_proj.weight, std=self.text.width ** -0.5)
        self.roi = (RoIProcessor(vw, config.roi, patch_size=self.patch_size)
                    if config.use_roi else None)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))
        self.logit_bias = (nn.Parameter(torch.tensor(float(config.init_logit_bias)))
                           if config.init_logit_bias is not None else None)
        self._tokenizer: Tokenizer | None = None
        self._text_cache: TextFeatureCache | None = None
        self.enable_text_cache(config.text.cache_when_frozen)
        #: metadata saved with the weights (``from_pretrained`` fills it; see persistence.py)
        self.pretrained_metadata: dict = {}

    @property
    def patch_size(self) -> int:
        return int(getattr(self.visual, "patch_size", 16))

    # ------------------------------------------------------------------ encoders
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing in both towers (recompute blocks in backward)."""
        self.visual.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's own tokenizer (built on first use): texts -> (ids, mask) int64 [N, L]."""
        if self._tokenizer is None:
            self._tokenizer = Tokenizer(self.config.text.name, self.config.text.context_length)
        return self._tokenizer(texts)

    def image_features(self, images: torch.Tensor) -> ImageFeatures:
        """images float [B, 3, H, W] (normalised) -> :class:`ImageFeatures` (one tower pass
        that ``encode_image`` / ``encode_regions`` / ``propose_boxes`` can share)."""
        if not torch.is_floating_point(images):
            raise TypeError(f"images must be a float tensor (normalised), got {images.dtype}")
        pooled, grid = self.visual(images)
        return ImageFeatures(pooled, grid, (int(images.shape[-2]), int(images.shape[-1])))

    def _features(self, images: torch.Tensor | ImageFeatures) -> ImageFeatures:
        return images if isinstance(images, ImageFeatures) else self.image_features(images)

    def patch_embeddings(self, images: torch.Tensor | ImageFeatures) -> torch.Tensor:
        """L2-normalised patch embeddings in the joint space, float32 [B, h, w, D]."""
        return F.normalize(self.image_proj(self._features(images).grid).float(), dim=-1)

    def propose_boxes(self, images: torch.Tensor | ImageFeatures, *,
                      text_emb: torch.Tensor | None = None, **overrides: Any
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Region proposals that need no annotation (``proposer.py``; docs/model.md).

        ``overrides``: any :class:`ProposerConfig` field (``num_boxes``, ``min_size``,
        ``max_fraction``, ``iou_threshold``, ``source``) over ``config.proposer``;
        ``text_emb`` [T, D]: the texts of ``source="text"``. Returns ``(boxes float32
        [B, K, 4] pixels of the images, counts int64 [B])``, K = ``num_boxes``.
        """
        feats = self._features(images)
        cfg = dataclasses.replace(self.config.proposer, **overrides) if overrides \
            else self.config.proposer
        with torch.no_grad():  # a selection: no gradient flows through the choice of boxes
            patches = F.normalize(self.image_proj(feats.grid).float(), dim=-1)
            glob = F.normalize(self.image_proj(feats.pooled).float(), dim=-1)
            sal = patch_saliency(patches, glob, cfg.source, text_emb)
            return propose_from_saliency(sal, feats.image_hw, cfg, patch_size=self.patch_size)

    def _regions(self, feats: ImageFeatures, boxes: Any, box_counts: torch.Tensor | None,
                 proposer: dict | None):
        if isinstance(boxes, str):
            if boxes != AUTO:
                raise ValueError(f"boxes must be a tensor, a list of tensors or {AUTO!r}, "
                                 f"got {boxes!r}")
            boxes, box_counts = self.propose_boxes(feats, **(proposer or {}))
        B = feats.pooled.shape[0]
        rois = boxes_to_rois(boxes, B, box_counts, device=feats.pooled.device)
        tokens, fused = self.roi(feats.grid, feats.pooled, rois, feats.image_hw)
        return tokens, fused, rois[:, 0].long()

    def encode_image(self, images: torch.Tensor | ImageFeatures, boxes: Any = None,
                     normalize: bool = True, *, box_counts: torch.Tensor | None = None,
                     proposer: dict | None = None) -> torch.Tensor:
        """images float [B, 3, H, W] (normalised) or their :class:`ImageFeatures` -> [B, D].

        ``boxes=None``: the global embedding. ``boxes="auto"``: region-aware, with boxes from
        :meth:`propose_boxes` (``proposer``: a dict of its overrides). Given boxes (pixels of
        ``images``: a list of ``[K_i, 4]``, a padded ``[B, Kmax, 4]`` with ``box_counts``
        ``[B]``, or ``[K, 5]`` rois): region-aware; an image with no boxes gets its global
        embedding. Without an RoI processor (``use_roi=False``) boxes are ignored.
        """
        feats = self._features(images)
        pooled = feats.pooled
        if boxes is not None and self.roi is not None:
            _, pooled, _ = self._regions(feats, boxes, box_counts, proposer)
        x = self.image_proj(pooled)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_regions(self, images: torch.Tensor | ImageFeatures, boxes: Any,
                       normalize: bool = True, *, box_counts: torch.Tensor | None = None,
                       proposer: dict | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (global [B, D], region-aware [B, D], regions [K, D], region_batch long [K]);
        ``boxes`` as in :meth:`encode_image` (``"auto"`` included)."""
        if self.roi is None:
            raise RuntimeError("this model has no RoI processor (config.use_roi=False)")
        feats = self._features(images)
        tokens, fused, rb = self._regions(feats, boxes, box_counts, proposer)
        outs = [self.image_proj(t) for t in (feats.pooled, fused, tokens)]
        if normalize:
            outs = [F.normalize(t, dim=-1) for t in outs]
        return outs[0], outs[1], outs[2], rb

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor | None = None,
                    normalize: bool = True) -> torch.Tensor:
        """ids int64 [T, L], mask int64 [T, L] (1 = token) -> [T, D]."""
        if self._text_cache is not None and TextFeatureCache.applies_to(self.text):
            feats = self._text_cache.features(self.text, ids, mask).to(self.text_proj.weight.dtype)
        else:
            feats = self.text(ids, mask)
        x = self.text_proj(feats)
        return F.normalize(x, dim=-1) if normalize else x

    def enable_text_cache(self, enable: bool = True, max_entries: int = 200_000) -> None:
        """Cache the text tower's pooled output per distinct text while the tower is frozen
        (``text_cache.py``): each text is encoded once per run; ``text_proj`` still trains.
        On by default (``config.text.cache_when_frozen``); it acts only while every ``text``
        parameter has ``requires_grad=False``."""
        self._text_cache = TextFeatureCache(max_entries) if enable else None

    def patch_text_similarity(self, images: torch.Tensor | ImageFeatures,
                              text_emb: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of every patch with a text: images [B, 3, H, W] (or their
        features), text_emb [B, D] (one text per image) or [D] / [1, D] (one for all) ->
        [B, h, w] float32."""
        patches = self.patch_embeddings(images)
        t = F.normalize(text_emb.float(), dim=-1)
        if t.ndim == 1:
            t = t[None]
        if t.shape[0] == 1:
            t = t.expand(patches.shape[0], -1)
        if t.shape != (patches.shape[0], patches.shape[-1]):
            raise ValueError(f"text_emb must be [B={patches.shape[0]}, D={patches.shape[-1]}] "
                             f"or [D], got {tuple(text_emb.shape)}")
        return torch.einsum("bhwd,bd->bhw", patches, t)

    # ------------------------------------------------------------------ forward
    def _batch_ids(self, batch: dict, ids_key: str, mask_key: str, texts_key: str):
        if ids_key in batch:
            return batch[ids_key], batch.get(mask_key)
        if texts_key not in batch:
            raise KeyError(f"batch has neither {ids_key!r} nor {texts_key!r}")
        texts = batch[texts_key]
        if texts_key == "region_texts":
            texts = [t for per_image in texts for t in per_image]
        dev = batch["images"].device
        ids, mask = self.tokenize(list(texts))
        return ids.to(dev), mask.to(dev)

    def forward(self, batch: dict) -> dict:
        """``batch`` in the data layer's batch format (docs/design.md: images, boxes, box_counts, text_ids/text_mask,
        region_text_ids/region_text_mask; raw texts are tokenised when ids are absent).

        Returns ``image_global`` [B, D], ``image_fused`` [B, D] or None, ``region`` [K, D] or
        None, ``region_batch`` long [K], ``text`` [B, D], ``region_text`` [K, D] or None,
        ``logit_scale`` (exp'ed, clamped to ``max_logit_scale``), ``logit_bias`` or None. The
        region entries are None without an RoI processor or without ``boxes`` in the batch;
        with boxes but K = 0 they are empty ``[0, D]`` tensors.
        """
        images = batch["images"]
        feats = self.image_features(images)
        pooled = feats.pooled
        out: dict[str, Any] = {"image_fused": None, "region": None, "region_text": None,
                               "region_batch": torch.zeros(0, dtype=torch.long,
                                                           device=images.device)}
        use_regions = self.roi is not None and batch.get("boxes") is not None
        if use_regions:
            tokens, fused, rb = self._regions(feats, batch["boxes"], batch.get("box_counts"),
                                              None)
            out["image_fused"] = F.normalize(self.image_proj(fused), dim=-1)
            out["region"] = F.normalize(self.image_proj(tokens), dim=-1)
            out["region_batch"] = rb
        out["image_global"] = F.normalize(self.image_proj(pooled), dim=-1)

        ids, mask = self._batch_ids(batch, "text_ids", "text_mask", "texts")
        out["text"] = self.encode_text(ids, mask)
        if use_regions and ("region_text_ids" in batch or "region_texts" in batch):
            rids, rmask = self._batch_ids(batch, "region_text_ids", "region_text_mask",
                                          "region_texts")
            K = out["region"].shape[0]
            if rids.shape[0] != K:
                raise ValueError(f"batch has {rids.shape[0]} region texts for {K} boxes "
                                 "(sum of box_counts)")
            # a separate call: region texts are short, padding them to the image texts' length
            # would double the text tower's work
            out["region_text"] = (self.encode_text(rids, rmask) if K else
                                  out["text"].new_zeros(0, out["text"].shape[1]))
        out["logit_scale"] = self.logit_scale.exp().clamp(max=self.config.max_logit_scale)
        out["logit_bias"] = self.logit_bias
        return out

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, directory: str | os.PathLike, metadata: dict | None = None) -> str:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` (atomically);
        ``metadata``: JSON-able dict saved with them (see ``persistence.py``)."""
        return persistence.save_pretrained(self, directory, metadata)

    @staticmethod
    def read_config(directory: str | os.PathLike) -> RegionMedConfig:
        """The config saved in ``directory/config.json``."""
        return persistence.read_config(directory)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike,
                        config: RegionMedConfig | None = None,
                        map_location: str | torch.device = "cpu") -> "RegionMedCLIP":
        """Load a ``save_pretrained`` folder. ``config`` builds another architecture and loads
        the weights into it: any key or shape that does not fit is an error naming the keys
        and the config fields that differ. ``model.pretrained_metadata`` holds the folder's
        metadata."""
        ckpt_cfg = persistence.read_config(directory)
        model = cls(config or ckpt_cfg, load_text_weights=False)
        persistence.load_weights(model, directory, map_location, source_config=ckpt_cfg)
        model.pretrained_metadata = persistence.read_metadata(directory)
        return model

    def load_pretrained_weights(self, directory: str | os.PathLike,
                                map_location: str | torch.device = "cpu") -> None:
        """Load ``directory/model.safetensors`` into this model, strictly."""
        persistence.load_weights(self, directory, map_location)

    def load_state_dict_checked(self, state: dict[str, torch.Tensor], source: str = "state dict",
                                source_config: RegionMedConfig | None = None) -> None:
        """``load_state_dict(strict=True)`` with one clear error listing missing, unexpected
        and shape-mismatched keys (and the config fields that differ, when known)."""
        persistence.load_state_dict_checked(self, state, source, source_config)
