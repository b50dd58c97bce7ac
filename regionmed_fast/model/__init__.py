"""RegionMed-CLIP model: image and text towers, the RoI processor, the region proposer, and an
OpenCLIP-style factory.

    model, _, preprocess = create_model_and_transforms("regionmed-tiny")
    tok = get_tokenizer("regionmed-tiny")
    img = model.encode_image(images, boxes=[torch.tensor([[10., 20., 30., 40.]])])
    auto = model.encode_image(images, boxes="auto")   # boxes from the model's own proposer
    txt = model.encode_text(*tok(["a 6 mm calcified nodule in the right upper zone"]))
"""
from __future__ import annotations

from regionmed_fast._lazy import lazy_getattr

_EXPORTS = {
    **dict.fromkeys(["ImageFeatures", "RegionMedCLIP"], "regionmed_fast.model.clip"),
    "RegionMedConfig": "regionmed_fast.model.config",
    **dict.fromkeys(["CLIP_MEAN", "CLIP_STD", "create_model", "create_model_and_transforms", "get_tokenizer",
                     "image_transform", "list_models", "model_config"], "regionmed_fast.model.factory"),
    **dict.fromkeys(["ProposerConfig", "patch_saliency", "propose_from_saliency"], "regionmed_fast.model.proposer"),
    **dict.fromkeys(["RoIConfig", "RoIProcessor", "boxes_to_rois"], "regionmed_fast.model.roi_processor"),
    **dict.fromkeys(["TextConfig", "TextEncoder", "Tokenizer"], "regionmed_fast.model.text"),
    **dict.fromkeys(["TimmBackbone", "VisionConfig", "VisionTransformer", "build_vision"], "regionmed_fast.model.vit"),
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr("regionmed_fast.model", _EXPORTS)
