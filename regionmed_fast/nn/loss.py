"""``ChunkedClipLoss`` / ``ChunkedSigLipLoss``: drop-ins for ``open_clip.ClipLoss`` /
``open_clip.SigLipLoss`` over :func:`regionmed_fast.ops.chunked_clip_loss`."""
from __future__ import annotations

import torch
from torch import nn

from regionmed_fast.ops.loss import chunked_clip_loss

__all__ = ["ChunkedClipLoss", "ChunkedSigLipLoss"]

#: ``open_clip.SigLipLoss``'s ways of exchanging the texts between ranks; all give the same loss
#: and gradients, which the all-gather of ``chunked_clip_loss`` computes for each of them.
SIGLIP_DIST_IMPLS = ("bidir", "shift", "reduce", "gather")


class ChunkedClipLoss(nn.Module):
    """CLIP / SigLIP loss without the ``N x M`` logits; ``open_clip.ClipLoss``'s constructor and call.

    open_clip's arguments keep their meaning: with ``world_size > 1`` the loss runs over
    ``group`` (the default process group when ``None``; its rank and size must equal ``rank``
    and ``world_size``; a ``group`` given with the default ``world_size=1`` is used as it is),
    and ``local_loss`` / ``gather_with_grad`` give each rank the loss and the gradients (before
    DDP's averaging) that ``open_clip.ClipLoss`` gives it (see :func:`chunked_clip_loss`).
    ``cache_labels`` is accepted: there are no labels to cache, so it changes nothing. Horovod
    is not supported (a clear error).

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
        name = type(self).__name__
        if use_horovod:
            raise ValueError(f"{name}: use_horovod=True is not supported; use torch.distributed")
        if kind not in ("softmax", "sigmoid"):
            raise ValueError(f"{name}: kind must be 'softmax' or 'sigmoid', got {kind!r}")
        if kind == "sigmoid" and local_loss and not gather_with_grad:
            raise ValueError(f"{name}: kind='sigmoid' with local_loss=True needs gather_with_grad=True "
                             "(the texts would get no gradient)")
        for arg, v in (("rank", rank), ("world_size", world_size)):
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if arg == "rank" else 1):
                raise ValueError(f"{name}: {arg} must be an int >= {0 if arg == 'rank' else 1}, got {v!r}")
        if rank >= world_size:
            raise ValueError(f"{name}: rank={rank} is not below world_size={world_size}")
        self.local_loss = bool(local_loss)
        self.gather_with_grad = bool(gather_with_grad)
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
        if self.group is None and self.world_size <= 1:
            return None
        import torch.distributed as dist

        name = type(self).__name__
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(f"{name}: world_size={self.world_size} but torch.distributed "
                               "is not initialised")
        group = self.group if self.group is not None else dist.group.WORLD
        got = (dist.get_rank(group), dist.get_world_size(group))
        if self.world_size > 1 and got != (self.rank, self.world_size):
            raise ValueError(f"{name}: rank={self.rank}, world_size={self.world_size} but the process "
                             f"group has this process as rank {got[0]} of {got[1]}")
        return group

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale,
                logit_bias=None, output_dict: bool = False, *, positives=None):
        """``image_features [N, D]``, ``text_features [M, D]``, ``logit_scale`` (exponentiated,
        any one-element shape), optional ``logit_bias``.

        Returns the 0-d loss, or ``{"contrastive_loss": loss}`` when ``output_dict``.
        """
        loss = chunked_clip_loss(image_features, text_features, logit_scale, logit_bias,
                                 positives=positives, hard_negative_beta=self.hard_negative_beta,
                                 kind=self.kind, chunk_size=self.chunk_size, group=self._group(),
                                 local_loss=self.local_loss, gather_with_grad=self.gather_with_grad,
                                 backend=self.backend)
        return {"contrastive_loss": loss} if output_dict else loss

    def extra_repr(self) -> str:
        return (f"kind={self.kind!r}, hard_negative_beta={self.hard_negative_beta}, "
                f"local_loss={self.local_loss}, gather_with_grad={self.gather_with_grad}, "
                f"chunk_size={self.chunk_size}, backend={self.backend!r}, world_size={self.world_size}")


class ChunkedSigLipLoss(ChunkedClipLoss):
    """SigLIP loss; ``open_clip.SigLipLoss``'s constructor and call.

    With ``world_size > 1`` each rank's loss is its own images against every rank's texts,
    divided by its own number of images, and the texts get the gradient of every rank's loss:
    what each of open_clip's ``dist_impl`` exchanges computes (``local_loss=True,
    gather_with_grad=True`` of :func:`chunked_clip_loss`). ``dist_impl`` is checked against
    open_clip's values and changes nothing else. ``cache_labels`` changes nothing.
    """

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 dist_impl: str | None = None, *, chunk_size=None, backend: str = "auto",
                 group=None) -> None:
        if dist_impl is not None and dist_impl not in SIGLIP_DIST_IMPLS:
            raise ValueError(f"ChunkedSigLipLoss: dist_impl must be None or one of {SIGLIP_DIST_IMPLS}, "
                             f"got {dist_impl!r}")
        super().__init__(local_loss=True, gather_with_grad=True, cache_labels=cache_labels,
                         rank=rank, world_size=world_size, kind="sigmoid", chunk_size=chunk_size,
                         backend=backend, group=group)
        self.dist_impl = dist_impl or "bidir"
