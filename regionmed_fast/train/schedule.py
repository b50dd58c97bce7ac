"""A stage's length and learning-rate schedule."""
from __future__ import annotations

import math

import torch

from regionmed_fast.train.stages import Stage


def lr_at(stage: Stage, step: int, total: int, base_lr: float) -> float:
    """Linear warm-up over the stage's first ``warmup`` steps, then cosine to ``min_lr_ratio``."""
    warm = stage.warmup_steps(total)
    if step < warm:
        return base_lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    lo = stage.min_lr_ratio
    return base_lr * (lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def stage_steps(stage: Stage, batches_per_epoch: int, grad_accum: int) -> int:
    """Optimizer steps of a stage (``steps``, or ``epochs`` worth of full micro-batches)."""
    if stage.steps is not None:
        return stage.steps
    return max(1, int(stage.epochs * batches_per_epoch) // grad_accum)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
