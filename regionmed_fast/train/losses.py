"""The three losses of progressive training, on :func:`regionmed_fast.ops.chunked_clip_loss`.

* ``global``: image embedding (``image_global``) vs the image-level text;
* ``region``: fused region embedding (``region``) vs the region text;
* ``fused``: region-aware image embedding (``image_fused``) vs the image-level text.

Positives are given as group ids made from the (whitespace-normalised) text: two images with the
same caption, or two regions with the same description ("a 4 mm nodule in the left upper
zone"), are both correct for that text, not false negatives. Each stage's ``loss`` picks the
contrastive loss: ``softmax`` (CLIP InfoNCE, HN-NCE with ``hard_negative_beta``) or ``sigmoid``
(SigLIP, whose ``logit_bias`` gets its gradient only there: a softmax is blind to a shift). The ids are a stable 63-bit hash
of the text, so they agree across DDP ranks without exchanging strings.
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

import torch
import torch.distributed as dist

from regionmed_fast.ops.loss import chunked_clip_loss as loss_fn
from regionmed_fast.train.stages import Stage

_WS = re.compile(r"\s+")


def text_group_ids(texts: Sequence[str], device: torch.device | str = "cpu") -> torch.Tensor:
    """int64 ``[len(texts)]``: equal (whitespace-normalised) texts get equal ids on every rank."""
    ids = []
    for t in texts:
        key = _WS.sub(" ", t).strip().encode("utf-8")
        ids.append(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1)
    return torch.tensor(ids, dtype=torch.long, device=device)


_EMB_KEYS = ("image_global", "image_fused", "region", "text", "region_text")


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the message names the stage, step and batch."""


def nonfinite_outputs(out: dict) -> list[str]:
    """Names of the model outputs holding NaN/Inf (one reduction, one host sync when clean)."""
    present = [k for k in _EMB_KEYS if isinstance(out.get(k), torch.Tensor) and out[k].numel()]
    if not present:
        return []
    probe = torch.stack([out[k].detach().float().sum() for k in present])
    if bool(torch.isfinite(probe).all()):
        return []
    return [k for k in present if not bool(torch.isfinite(out[k]).all())]


def nonfinite_error(bad: list[str], value: float, parts: dict, batch: dict, *, stage: Stage,
                    stage_index: int, step: int, total: int, global_step: int, micro: int,
                    epoch_batch: tuple[int, int]) -> NonFiniteLossError:
    """The error that stops a run whose outputs (``bad``, from :func:`nonfinite_outputs`) or loss
    ``value`` are not finite, naming where: stage, step, micro-batch, epoch and batch, the sample
    indices and image files."""
    what = (f"model outputs {bad} hold NaN/Inf" if bad else
            f"loss is {value} (parts { {k: float(v) for k, v in parts.items()} })")
    images = [m.get("image") for m in batch.get("meta", [])][:8]
    return NonFiniteLossError(
        f"{what} at stage {stage_index + 1} {stage.name!r} step {step + 1} of {total} "
        f"(global step {global_step + 1}), micro-batch {micro} = epoch {epoch_batch[0]} "
        f"batch {epoch_batch[1]}; sample indices {batch.get('indices')} images {images}")


def compute_losses(out: dict, batch: dict, stage: Stage, *, backend: str = "auto",
                   chunk_size: int | None = None, group=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of the stage's losses over the (global, when ``group`` is given) batch.

    ``out`` is ``RegionMedCLIP.forward(batch)``'s dict. Returns ``(total, parts)`` where ``parts``
    maps each loss name to its unweighted scalar; ``stage.loss`` picks softmax (CLIP) or sigmoid
    (SigLIP, which trains ``logit_bias``) for all of them. With a ``group``, each rank passes its
    shard and gets the global-batch loss with ``gather_with_grad=True``: DDP's average of the
    ranks' gradients is then the one-process gradient, with no rescaling by hand. A stage asking
    for region losses of a model without an ROI processor is an error; a batch with no regions anywhere gives a region loss of
    zero that still touches the region parameters (so DDP sees the same graph on every rank).
    """
    scale = out["logit_scale"]
    bias = out.get("logit_bias")
    beta = float(stage.hard_negative_beta)
    # gather_with_grad: each rank's feature gradients are world_size x those of the global loss,
    # so DDP's average over ranks is the one-process gradient (docs/loss.md)
    kw = {"hard_negative_beta": beta, "kind": stage.loss, "chunk_size": chunk_size, "group": group,
          "gather_with_grad": group is not None, "backend": backend}
    device = out["text"].device
    txt_ids = text_group_ids(batch["texts"], device)
    parts: dict[str, torch.Tensor] = {}
    total = None
    for kind, weight in stage.losses.items():
        if weight <= 0:
            continue
        if kind == "global":
            loss = loss_fn(out["image_global"].float(), out["text"].float(), scale, bias,
                           positives=(txt_ids, txt_ids), **kw)
        elif kind == "fused":
            if out.get("image_fused") is None:
                raise RuntimeError(f"stage {stage.name!r} asks for the 'fused' loss but the model "
                                   "returned no image_fused (is its ROI processor off, or were "
                                   "the boxes dropped?)")
            loss = loss_fn(out["image_fused"].float(), out["text"].float(), scale, bias,
                           positives=(txt_ids, txt_ids), **kw)
        else:  # region
            region, region_text = out.get("region"), out.get("region_text")
            if region is None or region_text is None:
                raise RuntimeError(f"stage {stage.name!r} asks for the 'region' loss but the model "
                                   "returned no region embeddings (is its ROI processor off?)")
            flat = [t for texts in batch["region_texts"] for t in texts]
            rid = text_group_ids(flat, device)
            if _global_count(region.shape[0], group, device) == 0:
                loss = region.sum() * 0.0 + region_text.sum() * 0.0
            else:
                loss = loss_fn(region.float(), region_text.float(), scale, bias,
                               positives=(rid, rid), **kw)
        parts[kind] = loss
        total = loss * weight if total is None else total + loss * weight
    assert total is not None  # parse_stage rejects all-zero weights
    return total, parts


def _global_count(k: int, group, device) -> int:
    if group is None:
        return k
    t = torch.tensor([k], dtype=torch.long, device=device)
    dist.all_reduce(t, group=group)
    return int(t.item())
