"""``ChunkedClipLoss``: a drop-in for ``open_clip.ClipLoss`` (and, with ``kind="sigmoid"``,
``open_clip.SigLipLoss``) over :func:`regionmed_fast.ops.chunked_clip_loss`."""
from __future__ import annotations

import torch
from torch import nn

from regionmed_fast.ops.loss import chunked_clip_loss

__all__ = ["ChunkedClipLoss"]


class ChunkedClipLoss(nn.Module):
    """CLIP / SigLIP loss without the ``N x M`` logits; same constructor and call as open_clip.

    open_clip's arguments: ``local_loss``, ``gather_with_grad``, ``cache_labels``, ``rank``,
    ``world_size``, ``use_horovod``. With ``world_size > 1`` the loss runs over ``group`` (the
    default process group when ``None``) and is the loss of the *global* batch on every rank,
    with exact gradients for each rank's own shard: no rank holds the global logits. That is the
    value of open_clip's ``local_loss=False``; ``local_loss`` and ``gather_with_grad`` are
    accepted for compatibility and do not change it. ``cache_labels`` has nothing to cache
    here. Horovod is not supported.

    Extras: ``kind`` (``"softmax"`` or ``"sigmoid"``), ``hard_negative_beta`` (HN-NCE),
    ``chunk_size``, ``backend``, ``group``; ``forward`` also takes ``positives``
    (``(image_ids, text_ids)``, equal ids are positives).
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False,
                 cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 use_horovod: bool = False, *, kind: str = "softmax",
                 hard_negative_beta: float = 0.0, chunk_size=None, backend: str = "auto",
                 group=None) -> None:
        super().__init__()
        if use_horovod:
            raise ValueError("ChunkedClipLoss: use_horovod=True is not supported; use torch.distributed")
        if kind not in ("softmax", "sigmoid"):
            raise ValueError(f"ChunkedClipLoss: kind must be 'softmax' or 'sigmoid', got {kind!r}")
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = use_horovod
        self.kind = kind
        self.hard_negative_beta = hard_negative_beta
        self.chunk_size = chunk_size
        self.backend = backend
        self.group = group

    def _group(self):
        if self.group is not None or self.world_size <= 1:
            return self.group
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(f"ChunkedClipLoss: world_size={self.world_size} but torch.distributed "
                               "is not initialised")
        return dist.group.WORLD

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale,
                logit_bias=None, output_dict: bool = False, *, positives=None):
        """``image_features [N, D]``, ``text_features [M, D]``, ``logit_scale`` (exponentiated).

        Returns the 0-d loss, or ``{"contrastive_loss": loss}`` when ``output_dict``.
        """
        loss = chunked_clip_loss(image_features, text_features, logit_scale, logit_bias,
                                 positives=positives, hard_negative_beta=self.hard_negative_beta,
                                 kind=self.kind, chunk_size=self.chunk_size, group=self._group(),
                                 backend=self.backend)
        return {"contrastive_loss": loss} if output_dict else loss

    def extra_repr(self) -> str:
        return (f"kind={self.kind!r}, hard_negative_beta={self.hard_negative_beta}, "
                f"chunk_size={self.chunk_size}, backend={self.backend!r}, world_size={self.world_size}")
