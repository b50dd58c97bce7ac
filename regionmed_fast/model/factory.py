"""OpenCLIP-style factory: ``create_model_and_transforms``, ``get_tokenizer``, ``list_models``.

Names: ``regionmed-tiny`` (ViT 192x4 at 128 px: CPU demo and tests), ``regionmed-base``
(ViT-B/16 at 224 px: the paper's scale), ``timm:<model>`` (any timm backbone, random init unless
``vision={"timm_kwargs": ...}`` points at local weights), or a ``save_pretrained`` folder.
"""
from __future__ import annotations

import copy
import os
from typing import Any

import torch

from .clip import CONFIG_FILE, RegionMedCLIP, RegionMedConfig
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
_SECTIONS = ("vision", "text", "roi")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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


class _ToRGB:
    def __call__(self, img):
        return img.convert("RGB") if hasattr(img, "convert") else img


def image_transform(image_size: int, train: bool):
    """PIL image -> normalised float [3, S, S]. No flips or crops: left/right is in the texts
    and boxes must stay valid (box-aware augmentation is in ``regionmed_fast.data.transforms``).
    Training adds a mild brightness/contrast jitter."""
    from torchvision import transforms as T
    steps = [_ToRGB(), T.Resize((image_size, image_size),
                                interpolation=T.InterpolationMode.BICUBIC)]
    if train:
        steps.append(T.ColorJitter(brightness=0.1, contrast=0.1))
    steps += [T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)]
    return T.Compose(steps)


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
    size = model.config.vision.image_size
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
