"""The progressive trainer: stages, mixed precision, fused AdamW, DDP, resumable checkpoints.

    from regionmed_fast.train.stages import load_run
    from regionmed_fast.train.trainer import Trainer
    summary = Trainer(load_run("stages.yaml"), data="DATA_DIR_OR_SHARDS", out="runs/x").fit()

Batches come from :func:`regionmed_fast.data.make_loader` (one loader per stage: the stage's
image size, ``--loader auto|cpu|dali``, worker processes, box-aware random resized crop and
side-aware flips), over the records of the trainer's ``split`` under the run's split rule
(``RunConfig.split_rule``, the one ``regionmed-fast eval`` reads back from the saved model).
The sample order and every crop are pure functions of (seed, stage, epoch, sample), so the
position in a run is just (stage, step): ``--resume`` restarts the loader at that micro-batch.

Under ``torchrun`` each process is one rank (gloo on CPUs, NCCL on GPUs); ``batch_size`` in the
config is the GLOBAL micro-batch, split evenly over ranks (rank ``r`` takes its elements
``r::world``), and the contrastive losses are taken over the global batch (embeddings are
gathered), so a run gives the same result whatever the number of processes. One optimizer
step = ``grad_accum`` micro-batches.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Callable, Iterator

import torch
from torch.nn.parallel import DistributedDataParallel

from regionmed_fast.data.loader import make_loader
from regionmed_fast.errors import UserError
from regionmed_fast.model import create_model_and_transforms, get_tokenizer
from regionmed_fast.train import checkpoint as ckpt_mod
from regionmed_fast.train.dist import Dist
from regionmed_fast.train.freeze import apply_freeze
from regionmed_fast.train.losses import (NonFiniteLossError, compute_losses, nonfinite_error,
                                         nonfinite_outputs)
from regionmed_fast.train.progress import RunLog, StageProgress
from regionmed_fast.train.schedule import lr_at, set_lr, stage_steps
from regionmed_fast.train.stages import RunConfig, Stage

__all__ = ["Trainer", "NonFiniteLossError", "build_model", "lr_at", "stage_steps"]

_MODEL_KEYS = ("images", "boxes", "box_counts", "text_ids", "text_mask", "region_text_ids",
               "region_text_mask")
_REGION_KEYS = ("boxes", "box_counts", "region_text_ids", "region_text_mask")


def build_model(cfg: RunConfig):
    """``(model, tokenizer)`` of ``cfg.model``; the global-only baseline has its ROI processor off."""
    kwargs = dict(cfg.model_args)
    if cfg.backend != "auto":  # the ROI processor's op follows the run's backend choice
        kwargs["roi"] = {**kwargs.get("roi", {}), "backend": cfg.backend}
    if cfg.baseline == "global":
        kwargs["use_roi"] = False
    model = create_model_and_transforms(cfg.model, **kwargs)[0]
    text = model.config.text
    return model, get_tokenizer(text.name, text.context_length)


def _rng_isolated(it: Iterator) -> Iterator:
    """``it`` with every ``next`` run under ``torch.random.fork_rng``: starting data worker
    processes draws from the global CPU generator (their base seed), which would shift the
    model's dropout stream by where in the run the loader started, and so break exact resume."""
    while True:
        with torch.random.fork_rng(devices=[]):
            try:
                item = next(it)
            except StopIteration:
                return
        yield item


@dataclasses.dataclass
class _StageRun:
    """What one stage runs with (built by :meth:`Trainer._setup_stage`)."""

    index: int
    stage: Stage
    image_size: int
    loader: object  # regionmed_fast.data.loader.Loader of this stage and rank
    total: int  # optimizer steps of the stage
    start: int  # optimizer steps already done (resume)
    net: torch.nn.Module  # the model as trained (DDP / compiled wrapper)
    base_lr: float
    with_regions: bool
    params: list[torch.nn.Parameter]  # the parameters this stage trains


class Trainer:
    """Runs the stages of ``cfg`` on ``data`` (its ``split`` records), writing
    ``out/checkpoints/last.pt``, ``out/train_log.jsonl``, ``out/tb/``, ``out/model/`` and
    ``out/train_images.txt`` (every image a training batch held: what a held-out set must avoid).

    ``model``/``tokenizer`` may be given (else built from ``cfg.model``); ``resume=True``
    continues from ``out/checkpoints/last.pt`` when it exists. ``progress`` shows a tqdm bar on
    rank 0. ``on_step`` (optional) is called as ``on_step(trainer, record)`` after each logged
    step.
    """

    def __init__(self, cfg: RunConfig, data: str, out: str, *, resume: bool = False,
                 device: str | None = None, model: torch.nn.Module | None = None,
                 tokenizer: Callable | None = None, progress: bool = True, split: str = "train",
                 on_step: Callable | None = None, tensorboard: bool = True, verbose: bool = True):
        self.cfg, self.data, self.out, self.split = cfg, data, out, split
        self.dist = Dist(device)
        self.progress, self.on_step, self.verbose = progress, on_step, verbose
        torch.manual_seed(cfg.seed)
        if model is None:
            model, tok = build_model(cfg)
            tokenizer = tokenizer or tok
        if tokenizer is None:
            raise ValueError("a tokenizer is needed when a model is given")
        self.model = model.to(self.dist.device)
        self.tokenizer = tokenizer
        if cfg.grad_checkpointing:
            fn = getattr(self.model, "set_grad_checkpointing", None)
            if fn is None:
                raise ValueError(f"grad_checkpointing=True but {type(model).__name__} has no "
                                 "set_grad_checkpointing(enable) method")
            fn(True)
        if cfg.batch_size % self.dist.world:
            raise UserError(f"batch_size={cfg.batch_size} (the global micro-batch) must be "
                            f"divisible by the number of processes, {self.dist.world}")
        self.optimizer = self._make_optimizer()
        # the loss op has no "cuda" backend of its own (its GPU kernels are Triton)
        self._loss_backend = "auto" if cfg.backend == "cuda" else cfg.backend
        self.amp_dtype = self._amp_dtype()
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.global_step = 0
        # images of the batches consumed since the last checkpoint (written with it)
        self._seen: set[str] = set()
        self.images_path = os.path.join(out, "train_images.txt")
        self.position = (0, 0)  # (stage index, optimizer steps done in it)
        self.ckpt_path = os.path.join(out, "checkpoints", ckpt_mod.LAST)
        self.log = RunLog(out, main=self.dist.main, tensorboard=tensorboard, say=self._say)
        self.log_path = self.log.path
        if resume and os.path.isfile(self.ckpt_path):
            self._load(self.ckpt_path)
        else:
            self.log.restart()
            if self.dist.main and os.path.isfile(self.images_path):
                os.remove(self.images_path)

    @property
    def history(self) -> list[dict]:
        """Every logged step record so far (restored on resume)."""
        return self.log.history

    # ---------------------------------------------------------------- set-up pieces
    def _say(self, msg: str) -> None:
        if self.verbose and self.dist.main:
            print(msg, flush=True)

    def _amp_dtype(self) -> torch.dtype | None:
        p, dev = self.cfg.precision, self.dist.device
        if p == "fp32":
            return None
        if p == "auto":
            if dev.type == "cuda" and torch.cuda.is_bf16_supported():
                return torch.bfloat16
            return None  # bf16 autocast on most CPUs is slower than fp32
        if p == "fp16" and dev.type != "cuda":
            raise ValueError("precision=fp16 needs a CUDA device (use bf16 or fp32 on the CPU)")
        return torch.bfloat16 if p == "bf16" else torch.float16

    def _make_optimizer(self) -> torch.optim.Optimizer:
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            (decay if p.ndim >= 2 and "logit" not in name else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": self.cfg.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        kw = {"fused": True} if self.dist.device.type == "cuda" else {"foreach": True}
        return torch.optim.AdamW(groups, lr=self.cfg.lr, betas=(0.9, 0.98), eps=1e-6, **kw)

    def _stage_loader(self, si: int, size: int):
        """This rank's loader of stage ``si``: training augmentation, the run's split rule."""
        cfg, dev = self.cfg, self.dist.device
        return make_loader(
            self.data, image_size=size, batch_size=cfg.batch_size // self.dist.world, train=True,
            tokenizer=self.tokenizer, backend=cfg.loader, num_workers=cfg.num_workers,
            seed=cfg.seed, stage=si, rank=self.dist.rank, world=self.dist.world,
            skip_bad=cfg.skip_bad, cache_mb=cfg.cache_mb, split=self.split, **cfg.split_rule(),
            flip_p=cfg.flip_p, scale=tuple(cfg.crop_scale),
            device=dev if dev.type == "cuda" else None)

    def _freeze(self, stage: Stage) -> list[str]:
        """Set which parameters ``stage`` trains; returns their names."""
        missing_ok = ("roi",) if self.cfg.baseline == "global" else ()
        return apply_freeze(self.model, stage.frozen, stage=stage.name, missing_ok=missing_ok)

    def _wrap(self) -> torch.nn.Module:
        net = self.model
        if self.dist.world > 1:
            # the set of trainable parameters changes per stage, so DDP is rebuilt per stage;
            # find_unused_parameters: a global-only stage never touches the ROI processor.
            ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
            net = DistributedDataParallel(net, device_ids=ids, find_unused_parameters=True)
        if self.cfg.compile:
            net = torch.compile(net)
        return net

    def _setup_stage(self, si: int, stage: Stage) -> _StageRun:
        cfg = self.cfg
        size = stage.image_size or cfg.image_size
        loader = self._stage_loader(si, size)
        total = stage_steps(stage, loader.batches_per_epoch, cfg.grad_accum)
        start = self.position[1] if si == self.position[0] else 0
        self.position = (si, start)
        self._freeze(stage)
        net = self._wrap()
        net.train()
        base_lr = stage.lr if stage.lr is not None else cfg.lr
        wd = stage.weight_decay if stage.weight_decay is not None else cfg.weight_decay
        self.optimizer.param_groups[0]["weight_decay"] = wd
        run = _StageRun(si, stage, size, loader, total, start, net, base_lr,
                        with_regions=stage.needs_regions() and cfg.baseline != "global",
                        params=[p for p in self.model.parameters() if p.requires_grad])
        self._say(f"stage {si + 1}/{len(cfg.stages)} {stage.name!r}: {total} steps "
                  f"(batch {cfg.batch_size} x accum {cfg.grad_accum}, {size} px, {stage.loss} "
                  f"losses {stage.losses}, lr {base_lr:g}, frozen {stage.frozen or '-'})"
                  + (f", from step {start}" if start else ""))
        return run

    # ---------------------------------------------------------------- checkpoints
    def _save(self) -> None:
        gathered = self.dist.gather_objects((ckpt_mod.rng_state(), sorted(self._seen)))
        self._seen.clear()
        rng = [g[0] for g in gathered]
        if not self.dist.main:
            return
        self._write_images(set().union(*(g[1] for g in gathered)))
        state = {
            "format": ckpt_mod.FORMAT_VERSION,
            "config": self.cfg.fingerprint(),
            "model_config": ckpt_mod.model_config_dict(self.model),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "position": {"stage": self.position[0], "step": self.position[1]},
            "global_step": self.global_step,
            "rng": rng,
            "world_size": self.dist.world,
            "history": self.history,
        }
        ckpt_mod.atomic_save(state, self.ckpt_path)

    def _write_images(self, seen: set[str]) -> None:
        """Add the images not yet in ``OUT/train_images.txt`` (one path per line, as the
        manifest names them): every image a batch of the run has held, up to the checkpoint."""
        known = set()
        if os.path.isfile(self.images_path):
            with open(self.images_path) as fh:
                known = set(fh.read().splitlines())
        new = sorted(seen - known)
        if new:
            with open(self.images_path, "a") as fh:
                fh.write("".join(f"{p}\n" for p in new))

    def _load(self, path: str) -> None:
        state = ckpt_mod.load(path)
        ckpt_mod.check_compatible(state, self.cfg.fingerprint(),
                                  ckpt_mod.model_config_dict(self.model), path)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.position = (state["position"]["stage"], state["position"]["step"])
        self.global_step = state["global_step"]
        rngs = state["rng"]
        ckpt_mod.set_rng_state(rngs[self.dist.rank] if self.dist.rank < len(rngs) else rngs[0])
        self.log.restart(state["history"])
        self._say(f"resumed from {path}: stage {self.position[0] + 1}, step {self.position[1]}, "
                  f"global step {self.global_step}")

    def _maybe_save(self, run: _StageRun, step: int) -> None:
        if (step + 1) % self.cfg.save_every == 0 and step + 1 < run.total:
            self._save()

    # ---------------------------------------------------------------- the loop
    def fit(self) -> dict:
        """Run (or finish) every stage; returns a summary dict (history, steps, final loss)."""
        t_start = time.time()
        try:
            for si, stage in enumerate(self.cfg.stages):
                if si >= self.position[0]:
                    self._run_stage(si, stage)
            if self.dist.main:
                self._save_model()
        finally:
            self.log.close()
        last = self.history[-1] if self.history else {}
        return {"out": self.out, "global_step": self.global_step, "final_loss": last.get("loss"),
                "history": self.history, "wall_s": time.time() - t_start}

    def trained_image_size(self) -> int:
        """The image size of the last stage: what the final weights were trained at."""
        return self.cfg.stages[-1].image_size or self.cfg.image_size

    def model_metadata(self) -> dict:
        """What ``save_pretrained`` stores beside the weights: the split rule (evaluation's
        defaults, so ``eval --split test`` scores what this run did not train on) and how the
        run trained."""
        cfg = self.cfg
        return {"split": {**cfg.split_rule(), "trained_on": self.split},
                "training": {"data": str(self.data), "seed": cfg.seed, "global_step": self.global_step,
                             "stages": [s.name for s in cfg.stages], "baseline": cfg.baseline,
                             "world_size": self.dist.world}}

    def _save_model(self) -> None:
        """``OUT/model``: ``save_pretrained`` with ``config.trained_image_size`` set."""
        save = getattr(self.model, "save_pretrained", None)
        if save is None:
            return
        config = getattr(self.model, "config", None)
        if config is not None and hasattr(config, "trained_image_size"):
            config.trained_image_size = self.trained_image_size()
        save(os.path.join(self.out, "model"), metadata=self.model_metadata())

    def _run_stage(self, si: int, stage: Stage) -> None:
        run = self._setup_stage(si, stage)
        ga = self.cfg.grad_accum
        prog = StageProgress(label=f"[{si + 1}/{len(self.cfg.stages)}] {stage.name}",
                             total=run.total, start=run.start, log_every=self.cfg.log_every,
                             samples_per_step=self.cfg.batch_size * ga,
                             bar=self.progress and self.dist.main)
        micro = _rng_isolated(run.loader.iterate(run.start * ga, run.total * ga))
        bpe = run.loader.batches_per_epoch
        for step in range(run.start, run.total):
            lr = lr_at(stage, step, run.total, run.base_lr)
            set_lr(self.optimizer, lr)
            loss, parts = self._accumulate(run, step, micro)
            grad_norm = self._optimizer_step(run.params)
            self.global_step += 1
            self.position = (si, step + 1)
            prog.tick()
            # the epochs whose last micro-batch this step consumed
            ended = range(step * ga // bpe, (step + 1) * ga // bpe)
            rec = None
            if prog.due(step) or ended:
                rec = {"stage": stage.name, "stage_index": si, "step": step + 1,
                       "global_step": self.global_step, "loss": loss,
                       **{f"loss_{k}": v for k, v in parts.items()}, "lr": lr,
                       "grad_norm": grad_norm, "samples_per_s": prog.samples_per_s(),
                       "epoch": (step + 1) * ga / bpe}
                if ended:
                    rec["skipped_bad"] = self._epoch_skipped(run, ended[-1])
                self.log.add(rec)
                if self.on_step is not None:
                    self.on_step(self, rec)
            prog.show(rec)
            self._maybe_save(run, step)
        prog.close()
        run.loader.close()
        self.position = (si + 1, 0)
        self._save()
        self.dist.barrier()

    def _epoch_skipped(self, run: _StageRun, epoch: int) -> int:
        """Bad records skipped in ``epoch`` of the stage over all ranks (every rank calls it at
        the same step): the manifest's once, plus each rank's found at decode. Said on rank 0
        when not zero."""
        loader = run.loader
        manifest = loader.manifest_skipped
        decoded = self.dist.sum_int(loader.bad_counts.get(epoch, manifest) - manifest)
        n = manifest + decoded
        if n:
            self._say(f"stage {run.index + 1} {run.stage.name!r} epoch {epoch}: skipped {n} bad "
                      f"record(s) ({manifest} in the manifest, {decoded} at decode)")
        return n

    def _accumulate(self, run: _StageRun, step: int,
                    micro: Iterator[tuple[int, dict]]) -> tuple[float, dict[str, float]]:
        """Forward and backward of the step's ``grad_accum`` micro-batches; returns the mean
        loss and loss parts (floats)."""
        ga = self.cfg.grad_accum
        loss_sum, parts_sum = 0.0, {}
        for m in range(ga):
            j, batch = next(micro)
            self._seen.update(m["image"] for m in batch["meta"])
            sync = m == ga - 1 or self.dist.world == 1
            ctx = contextlib.nullcontext() if sync or not hasattr(run.net, "no_sync") else run.net.no_sync()
            with ctx:
                value, parts = self._micro_batch(run, step, m, j, batch)
            loss_sum += value / ga
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v / ga
        return loss_sum, parts_sum

    def _micro_batch(self, run: _StageRun, step: int, m: int, j: int,
                     batch: dict) -> tuple[float, dict[str, float]]:
        dev = self.dist.device
        x = {k: batch[k].to(dev, non_blocking=True) for k in _MODEL_KEYS if k in batch}
        if not run.with_regions:  # a global-only stage: skip the ROI processor entirely
            for k in _REGION_KEYS:
                x.pop(k, None)
        with torch.autocast(dev.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            out = run.net(x)
        bad = nonfinite_outputs(out)
        if not bad:
            loss, parts = compute_losses(out, batch, run.stage, backend=self._loss_backend,
                                         chunk_size=self.cfg.loss_chunk_size, group=self.dist.group)
            value = float(loss.detach())
        else:
            loss, parts, value = None, {}, float("nan")
        if self.dist.any_flag(not math.isfinite(value)):
            raise nonfinite_error(bad, value, parts, batch, stage=run.stage, stage_index=run.index,
                                  step=step, total=run.total, global_step=self.global_step,
                                  micro=m, epoch_batch=divmod(j, run.loader.batches_per_epoch))
        self.scaler.scale(loss / self.cfg.grad_accum).backward()
        return value, {k: float(v.detach()) for k, v in parts.items()}

    def _optimizer_step(self, params: list[torch.nn.Parameter]) -> float:
        """Clip, step, zero; returns the gradient norm before clipping (NaN when not clipped)."""
        if self.cfg.max_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm))
        else:
            grad_norm = float("nan")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def close(self) -> None:
        self.dist.close()
