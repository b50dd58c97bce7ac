"""OpenCLIP-style factory: ``create_model_and_transforms``, ``get_tokenizer``, ``list_models``.

Names: ``regionmed-tiny`` (ViT 192x4 at 128 px: CPU demo and tests), ``regionmed-base``
(ViT-B/16 at 224 px: the paper's scale), ``timm:<model>`` (any timm backbone, random init unless
``vision={"timm_kwargs": ...}`` points at local weights), or a ``save_pretrained`` folder.
"""
from __future__ import annotations

import copy
import os
from typing import Any

import numpy as np
import torch

from regionmed_fast.data.transforms import (CLIP_MEAN, CLIP_STD, CropParams, crop_resize_flip,
                                            normalize_uint8_batch)

from .clip import RegionMedCLIP
from .config import RegionMedConfig
from .persistence import CONFIG_FILE
from .text import TINY, Tokenizer

_CONFIGS: dict[str, dict] = {
    "regionmed-tiny": {
        "embed_dim": 256,
        "vision": {"image_size": 128, "patch_size": 16, "width": 192, "depth": 4, "heads": 3},
        "text": {"name": "minilm"},
        "roi": {"heads": 4},
    },
    "regionmed-base": {
        "embed_dim": 512,
        "vision": {"image_size": 224, "patch_size": 16, "width": 768, "depth": 12, "heads": 12},
        "text": {"name": "minilm"},
        "roi": {"heads": 12},
    },
}
_SECTIONS = ("vision", "text", "roi", "proposer")


def list_models() -> list[str]:
    """Built-in model names (plus ``timm:<name>`` for any timm model)."""
    return sorted(_CONFIGS)


def _is_saved(name: str) -> bool:
    return os.path.isfile(os.path.join(name, CONFIG_FILE))


def model_config(name: str, **overrides: Any) -> RegionMedConfig:
    """The config of ``name`` with ``overrides`` applied.

    Overrides: any top-level field (``embed_dim``, ``use_roi``, ``init_logit_bias``...);
    ``vision`` / ``text`` / ``roi`` as partial dicts (``text`` may be just a name: ``"tiny"``,
    ``"minilm"``, a local HF folder); shortcuts ``image_size`` and ``grad_checkpointing``.
    """
    if _is_saved(name):
        base = RegionMedCLIP.read_config(name).to_dict()
    elif name.startswith("timm:"):
        base = copy.deepcopy(_CONFIGS["regionmed-base"])
        base["vision"] = {"timm": name[5:], "image_size": 224}
        base["roi"] = {"heads": 0}
    elif name in _CONFIGS:
        base = copy.deepcopy(_CONFIGS[name])
    else:
        raise ValueError(f"unknown model {name!r}: use one of {list_models()}, 'timm:<name>' "
                         "or a save_pretrained folder")
    base["name"] = base.get("name", name) if _is_saved(name) else name
    for k, v in overrides.items():
        if k == "image_size":
            base.setdefault("vision", {})["image_size"] = int(v)
        elif k == "grad_checkpointing":
            base.setdefault("vision", {})["grad_checkpointing"] = bool(v)
            base.setdefault("text", {})["grad_checkpointing"] = bool(v)
        elif k == "text" and isinstance(v, str):
            base.setdefault("text", {})["name"] = v
        elif k in _SECTIONS:
            if not isinstance(v, dict):
                raise ValueError(f"override {k} must be a dict, got {type(v).__name__}")
            base.setdefault(k, {}).update(v)
        else:
            base[k] = v
    return RegionMedConfig.from_dict(base, where=f"model {name!r} overrides")


class ImageTransform:
    """PIL image (or uint8 [H, W, 3] array) -> normalised float32 [3, S, S].

    The whole image resized to ``S x S`` with the data layer's eval path
    (``regionmed_fast.data.transforms.crop_resize_flip``, antialiased bilinear) and CLIP
    mean/std, so ``preprocess(image)`` equals what evaluation feeds the model. No flips or crops:
    left/right is in the texts and boxes must stay valid (box-aware augmentation is in
    ``regionmed_fast.data.transforms``). ``train=True`` adds a mild brightness/contrast jitter
    (factors uniform in [0.9, 1.1], drawn from torch's global generator)."""

    def __init__(self, image_size: int, train: bool = False) -> None:
        self.image_size, self.train = int(image_size), train

    def __call__(self, img) -> torch.Tensor:
        if hasattr(img, "convert"):
            img = img.convert("RGB")
        arr = np.asarray(img)
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"image must be a PIL image or uint8 [H, W, 3], got "
                             f"{arr.dtype} {arr.shape}")
        h, w = arr.shape[:2]
        pix = crop_resize_flip(arr, CropParams(0, 0, w, h, False), self.image_size)
        x = torch.from_numpy(np.ascontiguousarray(pix))[None]
        if self.train:
            b, c = (0.9 + 0.2 * torch.rand(2)).tolist()
            xf = x.float() * b
            xf = (xf - xf.mean()) * c + xf.mean()
            x = xf.round().clamp(0, 255).to(torch.uint8)
        return normalize_uint8_batch(x)[0]


def image_transform(image_size: int, train: bool) -> ImageTransform:
    """The OpenCLIP-style preprocess callable (see :class:`ImageTransform`)."""
    return ImageTransform(image_size, train)


def create_model(name: str = "regionmed-tiny", pretrained: str | None = None,
                 device: str | torch.device | None = None, **overrides: Any) -> RegionMedCLIP:
    """Build ``name`` (see :func:`model_config`); ``pretrained`` (or ``name`` itself) may be a
    ``save_pretrained`` folder whose weights are loaded strictly."""
    cfg = model_config(name, **overrides)
    weights = pretrained or (name if _is_saved(name) else None)
    if weights:
        model = RegionMedCLIP.from_pretrained(weights, config=cfg)
    else:
        model = RegionMedCLIP(cfg)
    return model.to(device) if device is not None else model


def create_model_and_transforms(name: str = "regionmed-tiny", pretrained: str | None = None,
                                device: str | torch.device | None = None, **overrides: Any):
    """-> ``(model, train_transform, eval_transform)`` as in OpenCLIP."""
    model = create_model(name, pretrained=pretrained, device=device, **overrides)
    size = model.config.eval_image_size
    return model, image_transform(size, True), image_transform(size, False)


def get_tokenizer(name: str = "regionmed-tiny", context_length: int | None = None) -> Tokenizer:
    """The tokenizer callable of a model name, a saved folder, or a text-tower name (``minilm``,
    ``tiny``, a local HF folder): ``tok(texts) -> (ids int64 [N, L], mask int64 [N, L])``."""
    if _is_saved(name) or name in _CONFIGS or name.startswith("timm:"):
        text = model_config(name).text
        return Tokenizer(text.name, context_length or text.context_length)
    if name in ("minilm", TINY) or os.path.isdir(name):
        return Tokenizer(name, context_length or 77)
    raise ValueError(f"unknown tokenizer {name!r}: a model name {list_models()}, 'minilm', "
                     "'tiny', or a local folder")
