"""Image encoders that return a pooled embedding and the patch grid.

:class:`VisionTransformer` is a plain pre-norm ViT on
``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU,
no xformers). :class:`TimmBackbone` wraps any timm model (ViTs and convnets) behind the same
``forward(images) -> (pooled [B, C], grid [B, h, w, C])`` contract.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from regionmed_fast.errors import require


@dataclass
class VisionConfig:
    """Image tower settings. ``timm`` set (a timm model name) replaces the built-in ViT."""
    image_size: int = 128
    patch_size: int = 16
    width: int = 192
    depth: int = 4
    heads: int = 3
    mlp_ratio: float = 4.0
    pool: str = "cls"  # "cls" or "mean" over patch tokens
    stem: str = "patch"  # "patch" (one strided conv) or "conv" (stride-2 3x3 convs, see ConvStem)
    grad_checkpointing: bool = False
    timm: str | None = None
    timm_kwargs: dict = field(default_factory=dict)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"vision width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ConvStem(nn.Module):
    """log2(patch) stride-2 3x3 convs (GroupNorm, GELU) then a 1x1 conv to the width, in place
    of the one-shot patchify (Xiao et al., "Early convolutions help transformers see better",
    2021): ViTs trained from scratch on small data converge much faster, and a lesion of a few
    pixels is picked up by small kernels before it is averaged into a 16x16 patch. GroupNorm,
    not BatchNorm, so DDP and single-process runs compute the same thing."""

    def __init__(self, width: int, patch_size: int) -> None:
        super().__init__()
        n = int(math.log2(patch_size))
        if 2 ** n != patch_size:
            raise ValueError(f"stem='conv' needs a power-of-two patch_size, got {patch_size}")
        layers, c_in = [], 3
        for i in range(n):
            c_out = max(16, width >> (n - 1 - i))
            layers += [nn.Conv2d(c_in, c_out, 3, 2, 1, bias=False),
                       nn.GroupNorm(min(8, c_out // 4), c_out), nn.GELU()]
            c_in = c_out
        layers.append(nn.Conv2d(c_in, width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class VisionTransformer(nn.Module):
    """Pre-norm ViT with a CLS token and learned position embeddings.

    ``forward(images [B, 3, H, W])`` -> ``(pooled [B, width], grid [B, H/p, W/p, width])``,
    both after the final LayerNorm, in the input dtype (or the autocast dtype). Images of a
    size other than ``config.image_size`` (progressive stages change it) get bicubically
    interpolated position embeddings; H and W must be multiples of the patch size.
    """

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        if c.image_size % c.patch_size:
            raise ValueError(f"image_size {c.image_size} is not a multiple of patch_size "
                             f"{c.patch_size}")
        if c.pool not in ("cls", "mean"):
            raise ValueError(f"vision pool must be 'cls' or 'mean', got {c.pool!r}")
        if c.stem not in ("patch", "conv"):
            raise ValueError(f"vision stem must be 'patch' or 'conv', got {c.stem!r}")
        self.width = c.width
        self.patch_size = c.patch_size
        self.patch_embed = (nn.Conv2d(3, c.width, c.patch_size, c.patch_size) if c.stem == "patch"
                            else ConvStem(c.width, c.patch_size))
        g = c.image_size // c.patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.width))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + g * g, c.width) * 0.02)
        self.blocks = nn.ModuleList(Block(c.width, c.heads, c.mlp_ratio) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.width, eps=1e-6)
        self.grad_checkpointing = c.grad_checkpointing
        self._init()

    def _init(self) -> None:
        nn.init.normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        # depth-scaled residual branches keep early training stable
        for b in self.blocks:
            b.attn.proj.weight.data.div_(math.sqrt(2 * len(self.blocks)))
            b.mlp[2].weight.data.div_(math.sqrt(2 * len(self.blocks)))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def _pos_embed(self, h: int, w: int) -> torch.Tensor:
        g0 = self.config.image_size // self.patch_size
        if (h, w) == (g0, g0):
            return self.pos_embed
        cls_pos, grid_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        grid_pos = grid_pos.reshape(1, g0, g0, -1).permute(0, 3, 1, 2)
        grid_pos = F.interpolate(grid_pos.float(), size=(h, w), mode="bicubic",
                                 align_corners=False).to(self.pos_embed.dtype)
        return torch.cat([cls_pos, grid_pos.permute(0, 2, 3, 1).reshape(1, h * w, -1)], 1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
        H, W = images.shape[-2:]
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size "
                             f"{self.patch_size}")
        x = self.patch_embed(images)  # [B, C, h, w]
        B, C, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(B, -1, -1).to(x.dtype), x], 1)
        x = x + self._pos_embed(h, w).to(x.dtype)
        for blk in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        x = self.norm(x)
        grid = x[:, 1:].reshape(B, h, w, C)
        pooled = x[:, 0] if self.config.pool == "cls" else x[:, 1:].mean(1)
        return pooled, grid


class TimmBackbone(nn.Module):
    """A timm model behind the ``(pooled, grid)`` contract.

    Token models (ViT, DeiT, EVA...) give their patch tokens as the grid (prefix tokens
    dropped); feature-map models (ConvNeXt, ResNet...) give their last map, permuted to NHWC.
    Weights are random unless ``timm_kwargs`` names a local file
    (``{"pretrained": True, "pretrained_cfg_overlay": {"file": "/path/weights.safetensors"}}``):
    nothing is downloaded.
    """

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        # optional: only timm backbones need it
        timm = require("timm", extra="timm", purpose=f"vision.timm={config.timm!r}")
        self.config = config
        kwargs = {"pretrained": False, "num_classes": 0, **config.timm_kwargs}
        if "vit" in config.timm or "deit" in config.timm or "eva" in config.timm:
            kwargs.setdefault("img_size", config.image_size)
            kwargs.setdefault("dynamic_img_size", True)
        try:
            self.model = timm.create_model(config.timm, **kwargs)
        except RuntimeError as e:
            raise ValueError(f"timm could not build vision.timm={config.timm!r}: {e}") from e
        self.width = self.model.num_features
        self.num_prefix_tokens = getattr(self.model, "num_prefix_tokens", 0)
        if config.grad_checkpointing:
            self.set_grad_checkpointing(True)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.model.forward_features(images)
        pooled = self.model.forward_head(feats, pre_logits=True)
        if feats.ndim == 4:  # NCHW feature map
            grid = feats.permute(0, 2, 3, 1)
        else:
            tokens = feats[:, self.num_prefix_tokens:]
            B, N, C = tokens.shape
            H, W = images.shape[-2:]
            h = round(math.sqrt(N * H / W))
            if h * (N // h) != N:
                raise ValueError(f"cannot fold {N} tokens of a {H}x{W} image into a grid")
            grid = tokens.reshape(B, h, N // h, C)
        return pooled, grid


def build_vision(config: VisionConfig) -> nn.Module:
    """The image tower for ``config``: timm when ``config.timm`` is set, else the built-in ViT."""
    return TimmBackbone(config) if config.timm else VisionTransformer(config)
