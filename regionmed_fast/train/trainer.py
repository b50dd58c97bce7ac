"""The progressive trainer: stages, mixed precision, fused AdamW, DDP, resumable checkpoints.

    from regionmed_fast.train.stages import load_run
    from regionmed_fast.train.trainer import Trainer
    summary = Trainer(load_run("stages.yaml"), data="DATA_DIR", out="runs/x").fit()

Under ``torchrun`` each process is one rank (gloo on CPUs, NCCL on GPUs); ``batch_size`` in the
config is the GLOBAL micro-batch, split evenly over ranks, and the contrastive losses are taken
over the global batch (embeddings are gathered), so a run gives the same result whatever the
number of processes. One optimizer step = ``grad_accum`` micro-batches.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable

import torch

from regionmed_fast.train import checkpoint as ckpt_mod
from regionmed_fast.train.data import SampleReader, StageStream, read_records
from regionmed_fast.train.losses import compute_losses, nonfinite_outputs
from regionmed_fast.train.stages import RunConfig, Stage

_MODEL_KEYS = ("images", "boxes", "box_counts", "text_ids", "text_mask", "region_text_ids",
               "region_text_mask")


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the message names the stage, step and batch."""


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


def model_config_dict(model: torch.nn.Module) -> dict | None:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    if dataclasses.is_dataclass(cfg):
        cfg = dataclasses.asdict(cfg)
    elif hasattr(cfg, "to_dict"):
        cfg = cfg.to_dict()
    elif not isinstance(cfg, dict):
        cfg = dict(vars(cfg))
    return json.loads(json.dumps(cfg, default=str))


def build_model(cfg: RunConfig):
    """``(model, tokenizer)`` of ``cfg.model``; the global-only baseline has its ROI processor off."""
    from regionmed_fast.model import create_model_and_transforms, get_tokenizer

    kwargs = dict(cfg.model_args)
    if cfg.backend != "auto":  # the ROI processor's op follows the run's backend choice
        kwargs["roi"] = {**kwargs.get("roi", {}), "backend": cfg.backend}
    if cfg.baseline == "global":
        kwargs["use_roi"] = False
    model = create_model_and_transforms(cfg.model, **kwargs)[0]
    text = model.config.text
    return model, get_tokenizer(text.name, text.context_length)


class _Dist:
    """torch.distributed state: initialised from torchrun's environment when WORLD_SIZE > 1."""

    def __init__(self, device: str | None):
        import torch.distributed as dist

        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        want_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        if want_cuda:
            self.device = torch.device("cuda", self.local_rank if device in (None, "cuda") else
                                       torch.device(device).index or 0)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        self.owns_group = False
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if want_cuda else "gloo")
            self.owns_group = True

    @property
    def group(self):
        """The default process group (None on one process). Looked up, not stored: a reference
        kept here would hold the group alive past ``destroy_process_group`` and gloo's worker
        threads would then be torn down unjoined at exit, aborting the rank."""
        if self.world == 1:
            return None
        import torch.distributed as dist

        return dist.group.WORLD

    @property
    def main(self) -> bool:
        return self.rank == 0

    def any_flag(self, flag: bool) -> bool:
        if self.world == 1:
            return flag
        import torch.distributed as dist

        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def gather_objects(self, obj):
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


class Trainer:
    """Runs the stages of ``cfg`` on the dataset folder ``data`` (its ``train`` split), writing
    ``out/checkpoints/last.pt``, ``out/train_log.jsonl``, ``out/tb/`` and ``out/model/``.

    ``model``/``tokenizer`` may be given (else built from ``cfg.model``); ``resume=True``
    continues from ``out/checkpoints/last.pt`` when it exists. ``progress`` shows a tqdm bar on
    rank 0. ``on_step`` (optional) is called as ``on_step(trainer, record)`` after each step.
    """

    def __init__(self, cfg: RunConfig, data: str, out: str, *, resume: bool = False,
                 device: str | None = None, model: torch.nn.Module | None = None,
                 tokenizer: Callable | None = None, progress: bool = True, split: str = "train",
                 cache_images: bool = True, on_step: Callable | None = None,
                 tensorboard: bool = True, verbose: bool = True):
        self.cfg, self.data, self.out, self.resume = cfg, data, out, resume
        self.dist = _Dist(device)
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
        self.records = read_records(data, split)
        self.cache_images = cache_images
        self._readers: dict[int, SampleReader] = {}
        self.optimizer = self._make_optimizer()
        # the loss op has no "cuda" backend of its own (its GPU kernels are Triton)
        self._loss_backend = "auto" if cfg.backend == "cuda" else cfg.backend
        self._loss_shared = [p for n, p in self.model.named_parameters()
                             if n in ("logit_scale", "logit_bias")]
        self.amp_dtype = self._amp_dtype()
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.history: list[dict] = []
        self.global_step = 0
        self.position = (0, 0)  # (stage index, optimizer steps done in it)
        self.ckpt_path = os.path.join(out, "checkpoints", ckpt_mod.LAST)
        self.log_path = os.path.join(out, "train_log.jsonl")
        self._tb = None
        if self.dist.main:
            os.makedirs(out, exist_ok=True)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self._tb = SummaryWriter(os.path.join(out, "tb"))
                except Exception as exc:  # tensorboard is an optional extra
                    self._say(f"tensorboard logging off ({type(exc).__name__}: {exc})")
        if resume and os.path.isfile(self.ckpt_path):
            self._load(self.ckpt_path)
        elif self.dist.main:
            open(self.log_path, "w").close()

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

    def _reader(self, size: int) -> SampleReader:
        if size not in self._readers:
            self._readers[size] = SampleReader(self.data, self.records, size, cache=self.cache_images)
        return self._readers[size]

    def _freeze(self, stage: Stage) -> None:
        names = [n for n, _ in self.model.named_parameters()]
        for prefix in stage.frozen:
            if not any(n == prefix or n.startswith(prefix + ".") or n.startswith(prefix) for n in names):
                if self.cfg.baseline == "global":
                    continue  # the baseline has no ROI processor to freeze
                tops = sorted({n.split(".")[0] for n in names})
                raise ValueError(f"stage {stage.name!r}: frozen prefix {prefix!r} matches no "
                                 f"parameter; top-level modules are {tops}")
        for n, p in self.model.named_parameters():
            p.requires_grad_(not any(n.startswith(f) for f in stage.frozen))

    def _wrap(self) -> torch.nn.Module:
        net = self.model
        if self.dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # the set of trainable parameters changes per stage, so DDP is rebuilt per stage;
            # find_unused_parameters: a global-only stage never touches the ROI processor.
            net = DDP(net, device_ids=[self.dist.device.index] if self.dist.device.type == "cuda" else None,
                      find_unused_parameters=True)
        if self.cfg.compile:
            net = torch.compile(net)
        return net

    # ---------------------------------------------------------------- checkpoints
    def _save(self) -> None:
        rng = self.dist.gather_objects(ckpt_mod.rng_state())
        if not self.dist.main:
            return
        state = {
            "format": ckpt_mod.FORMAT_VERSION,
            "config": self.cfg.fingerprint(),
            "model_config": model_config_dict(self.model),
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

    def _load(self, path: str) -> None:
        state = ckpt_mod.load(path)
        ckpt_mod.check_compatible(state, self.cfg.fingerprint(), model_config_dict(self.model), path)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.position = (state["position"]["stage"], state["position"]["step"])
        self.global_step = state["global_step"]
        self.history = list(state["history"])
        rngs = state["rng"]
        ckpt_mod.set_rng_state(rngs[self.dist.rank] if self.dist.rank < len(rngs) else rngs[0])
        if self.dist.main:  # the log restarts from what the checkpoint knew: no duplicated steps
            with open(self.log_path, "w") as fh:
                for rec in self.history:
                    fh.write(json.dumps(rec) + "\n")
        self._say(f"resumed from {path}: stage {self.position[0] + 1}, step {self.position[1]}, "
                  f"global step {self.global_step}")

    # ---------------------------------------------------------------- the loop
    def _inputs(self, batch: dict, with_regions: bool) -> dict:
        dev = self.dist.device
        x = {k: batch[k].to(dev, non_blocking=True) for k in _MODEL_KEYS if k in batch}
        if not with_regions:  # a global-only stage: skip the ROI processor entirely
            for k in ("boxes", "box_counts", "region_text_ids", "region_text_mask"):
                x.pop(k, None)
        return x

    def _log(self, rec: dict) -> None:
        self.history.append(rec)
        if not self.dist.main:
            return
        with open(self.log_path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        if self._tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k not in ("step", "global_step", "stage_index"):
                    self._tb.add_scalar(f"{k}", v, rec["global_step"])
            self._tb.flush()

    def fit(self) -> dict:
        """Run (or finish) every stage; returns a summary dict (history, steps, final loss)."""
        cfg = self.cfg
        t_start = time.time()
        try:
            for si, stage in enumerate(cfg.stages):
                if si < self.position[0]:
                    continue
                self._run_stage(si, stage)
            if self.dist.main:
                save = getattr(self.model, "save_pretrained", None)
                if save is not None:
                    save(os.path.join(self.out, "model"))
        finally:
            if self._tb is not None:
                self._tb.close()
        last = self.history[-1] if self.history else {}
        return {"out": self.out, "global_step": self.global_step, "final_loss": last.get("loss"),
                "history": self.history, "wall_s": time.time() - t_start}

    def _run_stage(self, si: int, stage: Stage) -> None:
        cfg = self.cfg
        size = stage.image_size or cfg.image_size
        stream = StageStream(self._reader(size), batch_size=cfg.batch_size, seed=cfg.seed, stage=si,
                             rank=self.dist.rank, world=self.dist.world, tokenizer=self.tokenizer,
                             num_workers=cfg.num_workers)
        total = stage_steps(stage, stream.batches_per_epoch, cfg.grad_accum)
        start = self.position[1] if si == self.position[0] else 0
        self.position = (si, start)
        self._freeze(stage)
        net = self._wrap()
        net.train()
        base_lr = stage.lr if stage.lr is not None else cfg.lr
        wd = stage.weight_decay if stage.weight_decay is not None else cfg.weight_decay
        self.optimizer.param_groups[0]["weight_decay"] = wd
        with_regions = stage.needs_regions() and cfg.baseline != "global"
        self._say(f"stage {si + 1}/{len(cfg.stages)} {stage.name!r}: {total} steps "
                  f"(batch {cfg.batch_size} x accum {cfg.grad_accum}, {size} px, losses "
                  f"{stage.losses}, lr {base_lr:g}, frozen {stage.frozen or '-'})"
                  + (f", from step {start}" if start else ""))
        bar = None
        if self.progress and self.dist.main and total > start:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=start, desc=f"[{si + 1}/{len(cfg.stages)}] {stage.name}",
                       dynamic_ncols=True, leave=True)
        ga = cfg.grad_accum
        micro = stream.iterate(start * ga, total * ga)
        params = [p for p in self.model.parameters() if p.requires_grad]
        t_last, n_last = time.time(), 0
        for step in range(start, total):
            lr = lr_at(stage, step, total, base_lr)
            for g in self.optimizer.param_groups:
                g["lr"] = lr
            parts_sum: dict[str, float] = {}
            loss_sum = 0.0
            for m in range(ga):
                j, batch = next(micro)
                sync = m == ga - 1 or self.dist.world == 1
                ctx = contextlib.nullcontext() if sync or not hasattr(net, "no_sync") else net.no_sync()
                with ctx:
                    with torch.autocast(self.dist.device.type, dtype=self.amp_dtype or torch.float32,
                                        enabled=self.amp_dtype is not None):
                        out = net(self._inputs(batch, with_regions))
                    bad = nonfinite_outputs(out)
                    if not bad:
                        loss, parts = compute_losses(out, batch, stage, backend=self._loss_backend,
                                                     chunk_size=cfg.loss_chunk_size, group=self.dist.group)
                        value = float(loss.detach())
                    else:
                        loss, parts, value = None, {}, float("nan")
                    if self.dist.any_flag(not math.isfinite(value)):
                        epoch, b = divmod(j, stream.batches_per_epoch)
                        what = (f"model outputs {bad} hold NaN/Inf" if bad else
                                f"loss is {value} (parts { {k: float(v) for k, v in parts.items()} })")
                        raise NonFiniteLossError(
                            f"{what} at stage {si + 1} {stage.name!r} step {step + 1} of {total} "
                            f"(global step {self.global_step + 1}), micro-batch {m} = epoch {epoch} "
                            f"batch {b}; sample indices {batch.get('indices')} images "
                            f"{[self.records[i]['image'] for i in batch.get('indices', [])][:8]}")
                    # the loss op gives each rank the gradient of the global loss for its own
                    # shard; DDP then averages over ranks, hence the factor world / grad_accum
                    self.scaler.scale(loss * (self.dist.world / ga)).backward()
                loss_sum += value / ga
                for k, v in parts.items():
                    parts_sum[k] = parts_sum.get(k, 0.0) + float(v.detach()) / ga
            if self.dist.world > 1:
                # logit_scale / logit_bias are inputs the loss op shares across ranks: it gives
                # every rank their FULL gradient, which the world-size factor above overcounts
                for p in self._loss_shared:
                    if p.grad is not None:
                        p.grad.div_(self.dist.world)
            if cfg.max_grad_norm > 0:
                self.scaler.unscale_(self.optimizer)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
            else:
                grad_norm = float("nan")
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.global_step += 1
            self.position = (si, step + 1)
            n_last += cfg.batch_size * ga
            if (step + 1) % cfg.log_every == 0 or step + 1 == total or step == start:
                now = time.time()
                sps = n_last / max(now - t_last, 1e-9)
                t_last, n_last = now, 0
                rec = {"stage": stage.name, "stage_index": si, "step": step + 1,
                       "global_step": self.global_step, "loss": loss_sum,
                       **{f"loss_{k}": v for k, v in parts_sum.items()}, "lr": lr,
                       "grad_norm": grad_norm, "samples_per_s": sps,
                       "epoch": (step + 1) * ga / stream.batches_per_epoch}
                self._log(rec)
                if bar is not None:
                    bar.set_postfix(loss=f"{loss_sum:.3f}", sps=f"{sps:.0f}", refresh=False)
                if self.on_step is not None:
                    self.on_step(self, rec)
            if bar is not None:
                bar.update(1)
            if (step + 1) % cfg.save_every == 0 and step + 1 < total:
                self._save()
        if bar is not None:
            bar.close()
        self.position = (si + 1, 0)
        self._save()
        self.dist.barrier()

    def close(self) -> None:
        self.dist.close()
