"""RegionMed-CLIP model: image and text towers, the RoI processor, the region proposer, and an
OpenCLIP-style factory.

    model, _, preprocess = create_model_and_transforms("regionmed-tiny")
    tok = get_tokenizer("regionmed-tiny")
    img = model.encode_image(images, boxes=[torch.tensor([[10., 20., 30., 40.]])])
    auto = model.encode_image(images, boxes="auto")   # boxes from the model's own proposer
    txt = model.encode_text(*tok(["a 6 mm calcified nodule in the right upper zone"]))
"""
from __future__ import annotations

from .clip import ImageFeatures, RegionMedCLIP
from .config import RegionMedConfig
from .factory import (CLIP_MEAN, CLIP_STD, create_model, create_model_and_transforms,
                      get_tokenizer, image_transform, list_models, model_config)
from .proposer import ProposerConfig, patch_saliency, propose_from_saliency
from .roi_processor import RoIConfig, RoIProcessor, boxes_to_rois
from .text import TextConfig, TextEncoder, Tokenizer
from .vit import TimmBackbone, VisionConfig, VisionTransformer, build_vision

__all__ = [
    "CLIP_MEAN", "CLIP_STD", "ImageFeatures", "ProposerConfig", "RegionMedCLIP",
    "RegionMedConfig", "RoIConfig", "RoIProcessor", "TextConfig", "TextEncoder", "TimmBackbone",
    "Tokenizer", "VisionConfig", "VisionTransformer", "boxes_to_rois", "build_vision",
    "create_model", "create_model_and_transforms", "get_tokenizer", "image_transform",
    "list_models", "model_config", "patch_saliency", "propose_from_saliency",
]
