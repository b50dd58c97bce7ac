"""RegionMedCLIP: image tower + text tower + ROI processor, CLIP-style projections.

Embeddings live in one ``embed_dim`` space: the global image embedding, the region-aware image
embedding, each region's embedding (all through ``image_proj``), and text embeddings (through
``text_proj``). The losses live in the trainer (``regionmed_fast.ops.chunked_clip_loss``).
Weights are saved as safetensors with a JSON config: no pickle anywhere.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .roi_processor import ROIConfig, ROIProcessor, boxes_to_rois
from .text import TextConfig, TextEncoder, Tokenizer
from .vit import VisionConfig, build_vision

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "regionmed-fast/RegionMedCLIP"
FORMAT_VERSION = 1


@dataclass
class RegionMedConfig:
    """Everything that shapes a RegionMedCLIP. ``use_roi=False`` is the global-only baseline
    (no ROI processor: same towers, same projections)."""
    name: str = "regionmed-tiny"
    embed_dim: int = 256
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    roi: ROIConfig = field(default_factory=ROIConfig)
    use_roi: bool = True
    init_logit_scale: float = math.log(1 / 0.07)
    init_logit_bias: float | None = None  # a float adds a learnable bias (SigLIP uses -10)
    max_logit_scale: float = 100.0
    # The input size the weights were last trained at (the trainer sets it from the last
    # stage); evaluation resizes images to it. None: the vision config's image_size.
    trained_image_size: int | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> "RegionMedConfig":
        """Build from a (possibly partial) dict; unknown keys are an error naming them."""
        nested = {"vision": VisionConfig, "text": TextConfig, "roi": ROIConfig}
        _check_keys(d, cls, where)
        kw = {}
        for k, v in d.items():
            if k in nested:
                if isinstance(v, nested[k]):
                    kw[k] = v
                    continue
                if not isinstance(v, dict):
                    raise ValueError(f"{where}.{k} must be a dict, got {type(v).__name__}")
                _check_keys(v, nested[k], f"{where}.{k}")
                kw[k] = nested[k](**v)
            else:
                kw[k] = v
        return cls(**kw)


def _check_keys(d: dict, cls, where: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown} (known: {sorted(known)})")


def _config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _config_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} (checkpoint) vs {vb!r} (model)")
    return out


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
        self.roi = (ROIProcessor(vw, config.roi, patch_size=getattr(self.visual, "patch_size", 16))
                    if config.use_roi else None)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))
        self.logit_bias = (nn.Parameter(torch.tensor(float(config.init_logit_bias)))
                           if config.init_logit_bias is not None else None)
        self._tokenizer: Tokenizer | None = None
        self.enable_text_cache(config.text.cache_when_frozen)

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

    def _towers(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not torch.is_floating_point(images):
            raise TypeError(f"images must be a float tensor (normalised), got {images.dtype}")
        return self.visual(images)

    def _regions(self, images, pooled, grid, boxes, box_counts):
        rois = boxes_to_rois(boxes, images.shape[0], box_counts, device=images.device)
        tokens, fused = self.roi(grid, pooled, rois, tuple(images.shape[-2:]))
        return tokens, fused, rois[:, 0].long()

    def encode_image(self, images: torch.Tensor, boxes: Any = None, normalize: bool = True, *,
                     box_counts: torch.Tensor | None = None) -> torch.Tensor:
        """images float [B, 3, H, W] (normalised) -> [B, D].

        With ``boxes`` (pixels of ``images``: a list of ``[K_i, 4]``, a padded ``[B, Kmax, 4]``
        with ``box_counts`` ``[B]``, or ``[K, 5]`` rois) and an ROI processor, the embedding is
        region-aware; images with no boxes get their global embedding.
        """
        pooled, grid = self._towers(images)
        if boxes is not None and self.roi is not None:
            _, pooled, _ = self._regions(images, pooled, grid, boxes, box_counts)
        x = self.image_proj(pooled)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_regions(self, images: torch.Tensor, boxes: Any, normalize: bool = True, *,
                       box_counts: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (global [B, D], region-aware [B, D], regions [K, D], region_batch long [K])."""
        if self.roi is None:
            raise RuntimeError("this model has no ROI processor (config.use_roi=False)")
        pooled, grid = self._towers(images)
        tokens, fused, rb = self._regions(images, pooled, grid, boxes, box_counts)
        outs = [self.image_proj(t) for t in (pooled, fused, tokens)]
        if normalize:
            outs = [F.normalize(t, dim=-1) for t in outs]
        return outs[0], outs[1], outs[2], rb

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor | None = None,
                    normalize: bool = True) -> torch.Tensor:
        """ids int64 [T, L], mask int64 [T, L] (1 = token) -> [T, D]."""
        if self._text_cache is not None and not any(p.requires_grad
                                                    for p in self.text.parameters()):
            # weights changed since the cache was filled (an unfrozen stage, a load): drop it
            version = sum(p._version for p in self.text.parameters())
            if version != self._text_cache_version:
                self._text_cache.clear()
                self._text_cache_version = version
            feats = self._cached_text_features(ids, mask)
        else:
            feats = self.text(ids, mask)
        x = self.text_proj(feats)
        return F.normalize(x, dim=-1) if normalize else x

    def enable_text_cache(self, enable: bool = True, max_entries: int = 200_000) -> None:
        """Cache the text tower's pooled output per distinct text while the tower is frozen
        (every ``text`` parameter has ``requires_grad=False``): a frozen tower maps a text to
        one vector, so each text is encoded once per run (misses run with dropout off). The
        trainable ``text_proj`` is applied after the cache. It is emptied whenever the text
        weights change (in-place updates or loads) and when disabled. On by default
        (``config.text.cache_when_frozen``): it only acts while the tower is frozen."""
        self._text_cache = {} if enable else None
        self._text_cache_max = max_entries
        self._text_cache_version = -1

    @torch.no_grad()
    def _cached_text_features(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        mask = torch.ones_like(ids) if mask is None else mask
        lengths = mask.sum(1).tolist()
        rows = ids.cpu().numpy()
        keys = [rows[i, :n].tobytes() for i, n in enumerate(lengths)]
        first: dict[bytes, int] = {}
        for i, k in enumerate(keys):
            if k not in self._text_cache:
                first.setdefault(k, i)  # duplicates in a batch are encoded once
        fresh: dict[bytes, torch.Tensor] = {}
        if first:
            miss = list(first.values())
            was = self.text.training
            self.text.eval()
            try:
                L = max(lengths[i] for i in miss)
                sel = torch.tensor(miss, device=ids.device)
                new = self.text(ids[sel, :L], mask[sel, :L]).float()
            finally:
                self.text.train(was)
            fresh = dict(zip(first, new))
            if len(self._text_cache) < self._text_cache_max:
                self._text_cache.update(fresh)
        dtype = self.text_proj.weight.dtype
        # .to(device): the cache may predate a model.to(...) move
        return torch.stack([fresh[k] if k in fresh else self._text_cache[k].to(ids.device)
                            for k in keys]).to(dtype)

    def patch_text_similarity(self, images: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of every patch with a text: images [B, 3, H, W], text_emb [B, D]
        (one text per image) or [D] / [1, D] (one for all) -> [B, h, w] float32."""
        _, grid = self._towers(images)
        patches = F.normalize(self.image_proj(grid).float(), dim=-1)
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
        """``batch`` as INTERFACES.md (images, boxes, box_counts, text_ids/text_mask,
        region_text_ids/region_text_mask; raw texts are tokenised when ids are absent).

        Returns ``image_global`` [B, D], ``image_fused`` [B, D] or None, ``region`` [K, D] or
        None, ``region_batch`` long [K], ``text`` [B, D], ``region_text`` [K, D] or None,
        ``logit_scale`` (exp'ed, clamped to ``max_logit_scale``), ``logit_bias`` or None. The
        region entries are None without an ROI processor or without ``boxes`` in the batch;
        with boxes but K = 0 they are empty ``[0, D]`` tensors.
        """
        images = batch["images"]
        pooled, grid = self._towers(images)
        out: dict[str, Any] = {"image_fused": None, "region": None, "region_text": None,
                               "region_batch": torch.zeros(0, dtype=torch.long,
                                                           device=images.device)}
        use_regions = self.roi is not None and batch.get("boxes") is not None
        if use_regions:
            tokens, fused, rb = self._regions(images, pooled, grid, batch["boxes"],
                                              batch.get("box_counts"))
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
    def save_pretrained(self, directory: str | os.PathLike) -> str:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` (each atomically:
        temp file + rename). Returns the directory."""
        from safetensors.torch import save_file
        d = os.fspath(directory)
        os.makedirs(d, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        tmp = os.path.join(d, WEIGHTS_FILE + ".tmp")
        save_file(state, tmp, metadata={"format": FORMAT})
        os.replace(tmp, os.path.join(d, WEIGHTS_FILE))
        tmp = os.path.join(d, CONFIG_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump({"format": FORMAT, "version": FORMAT_VERSION,
                       "config": self.config.to_dict()}, f, indent=2)
        os.replace(tmp, os.path.join(d, CONFIG_FILE))
        return d

    @staticmethod
    def read_config(directory: str | os.PathLike) -> RegionMedConfig:
        """The config saved in ``directory/config.json``."""
        path = os.path.join(os.fspath(directory), CONFIG_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: not a RegionMedCLIP save_pretrained folder")
        with open(path) as f:
            try:
                blob = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from e
        if blob.get("format") != FORMAT or "config" not in blob:
            raise ValueError(f"{path}: not a RegionMedCLIP config (format {blob.get('format')!r})")
        if blob.get("version", 0) > FORMAT_VERSION:
            raise ValueError(f"{path}: format version {blob['version']} is newer than this "
                             f"library's {FORMAT_VERSION}")
        return RegionMedConfig.from_dict(blob["config"], where=path)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike,
                        config: RegionMedConfig | None = None,
                        map_location: str | torch.device = "cpu") -> "RegionMedCLIP":
        """Load a ``save_pretrained`` folder. ``config`` builds another architecture and loads
        the weights into it: any key or shape that does not fit is an error naming the keys
        and the config fields that differ."""
        ckpt_cfg = cls.read_config(directory)
        model = cls(config or ckpt_cfg, load_text_weights=False)
        model.load_pretrained_weights(directory, map_location=map_location, _ckpt_cfg=ckpt_cfg)
        return model

    def load_pretrained_weights(self, directory: str | os.PathLike,
                                map_location: str | torch.device = "cpu",
                                _ckpt_cfg: RegionMedConfig | None = None) -> None:
        """Load ``directory/model.safetensors`` into this model, strictly (see
        :meth:`load_state_dict_checked`)."""
        from safetensors.torch import load_file
        path = os.path.join(os.fspath(directory), WEIGHTS_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found")
        ckpt_cfg = _ckpt_cfg or self.read_config(directory)
        state = load_file(path, device=str(map_location))
        self.load_state_dict_checked(state, source=path, source_config=ckpt_cfg)

    def load_state_dict_checked(self, state: dict[str, torch.Tensor], source: str = "state dict",
                                source_config: RegionMedConfig | None = None) -> None:
        """``load_state_dict(strict=True)`` with one clear error listing missing, unexpected
        and shape-mismatched keys (and the config fields that differ, when known)."""
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        shapes = [f"{k}: {tuple(state[k].shape)} (checkpoint) vs {tuple(own[k].shape)} (model)"
                  for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
        if missing or unexpected or shapes:
            def show(items):
                return ", ".join(items[:8]) + (f" ... ({len(items)} in all)" if len(items) > 8
                                               else "")
            parts = [f"checkpoint {source} does not fit this {self.config.name} model"]
            if source_config is not None:
                diff = _config_diff(source_config.to_dict(), self.config.to_dict())
                if diff:
                    parts.append("config differs: " + show(diff))
            if missing:
                parts.append("missing keys: " + show(missing))
            if unexpected:
                parts.append("unexpected keys: " + show(unexpected))
            if shapes:
                parts.append("shape mismatches: " + show(shapes))
            raise ValueError("; ".join(parts))
        self.load_state_dict(state, strict=True)
