"""Stage files: the progressive schedule of a run, in YAML or TOML.

A run file holds run-wide options and a list of stages::

    model: regionmed-tiny          # any name create_model_and_transforms accepts
    model_args: {text: tiny}       # its overrides (vision/text/roi dicts, image_size, use_roi...)
    batch_size: 32                 # GLOBAL micro-batch (split over DDP ranks)
    grad_accum: 1                  # micro-batches per optimizer step
    seed: 0
    precision: auto                # auto | bf16 | fp16 | fp32 (auto: bf16 on CUDA, fp32 on CPU)
    group_key: patient_id          # split rule of records without a split field (data/split.py)
    stages:
      - {name: global, epochs: 2, image_size: 64, losses: {global: 1.0}, lr: 1.0e-3}
      - {name: region, steps: 200, losses: {global: 1.0, region: 1.0}, frozen: [text]}
      - {name: hierarchical, epochs: 1, losses: {global: 1, region: 1, fused: 1},
         hard_negative_beta: 0.5, warmup: 0.1}

Each stage gives ``epochs`` (may be fractional) or ``steps`` (optimizer steps), never both.
``warmup`` is a step count (int >= 1) or a fraction of the stage (0 <= x < 1). ``frozen`` lists
module paths (``text``, ``visual.blocks.0``, ``roi``) or parameter names (``logit_scale``) kept
fixed during the stage: a path freezes that module's parameters and nothing else (``text`` is
not ``text_proj``). ``loss`` is ``softmax`` (CLIP, the default) or ``sigmoid`` (SigLIP). Unknown
keys are an error naming the file and the stage, so a typo never silently does nothing.
"""
from __future__ import annotations

import json
import os
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import yaml

from regionmed_fast.errors import UserError

LOSS_KINDS = ("global", "region", "fused")
#: ``Stage.loss``: the contrastive loss of :func:`regionmed_fast.ops.chunked_clip_loss` (``kind``)
LOSS_FUNCTIONS = ("softmax", "sigmoid")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
LOADERS = ("auto", "cpu", "dali")


class StageFileError(UserError, ValueError):
    """A stage file that cannot be used; the message names the file and the offending key."""


@dataclass
class Stage:
    """One stage of progressive training (see the module docstring for the file format)."""

    name: str
    losses: dict[str, float]
    epochs: float | None = None
    steps: int | None = None
    image_size: int | None = None  # None: the run's image_size
    frozen: list[str] = field(default_factory=list)  # module paths / parameter names
    loss: str = "softmax"  # "softmax" (CLIP) or "sigmoid" (SigLIP: needs the model's logit_bias)
    lr: float | None = None  # None: the run's lr
    weight_decay: float | None = None
    hard_negative_beta: float = 0.0
    warmup: float = 0.05
    min_lr_ratio: float = 0.1

    def needs_regions(self) -> bool:
        """True when a loss of this stage uses the ROI processor's outputs."""
        return any(self.losses.get(k, 0.0) > 0 for k in ("region", "fused"))

    def warmup_steps(self, total: int) -> int:
        if self.warmup >= 1:
            return min(int(self.warmup), total)
        return int(round(self.warmup * total))


@dataclass
class RunConfig:
    """Run-wide options and the stages. ``batch_size`` is the global micro-batch."""

    stages: list[Stage]
    model: str = "regionmed-tiny"
    model_args: dict = field(default_factory=dict)  # overrides for create_model_and_transforms
    image_size: int = 64
    batch_size: int = 32
    grad_accum: int = 1
    seed: int = 0
    lr: float = 5e-4
    weight_decay: float = 0.05
    precision: str = "auto"
    max_grad_norm: float = 1.0
    compile: bool = False
    grad_checkpointing: bool = False
    backend: str = "auto"  # backend of the fused ops (roi_pool_fuse, chunked_clip_loss)
    loss_chunk_size: int | None = None
    num_workers: int = 2  # data worker processes (CPU loader)
    loader: str = "auto"  # data loader backend: auto | cpu | dali (regionmed_fast.data.make_loader)
    skip_bad: bool = False  # skip (and count) corrupt images and degenerate boxes
    cache_mb: int = 0  # decoded-sample cache budget in MiB per process (0: stream from disk)
    # the split rule of records without a ``split`` field (regionmed_fast.data.split)
    group_key: str | None = None  # None: patient_id where present, else the image
    test_fraction: float = 0.3
    val_fraction: float = 0.0
    # training augmentation: box-aware random resized crop (area range) and side-aware flips
    crop_scale: tuple[float, float] = (0.5, 1.0)
    flip_p: float = 0.5
    log_every: int = 10
    save_every: int = 50  # optimizer steps between checkpoints (and one at every stage end)
    baseline: str | None = None  # "global": the global-only baseline (no ROI, region losses off)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def split_rule(self) -> dict[str, Any]:
        """The arguments of ``regionmed_fast.data.split.select_split`` this run trains with."""
        return {"group_key": self.group_key, "test_fraction": self.test_fraction,
                "val_fraction": self.val_fraction}

    def fingerprint(self) -> dict[str, Any]:
        """The part of the config a checkpoint must agree with to be resumed (what changes the
        result); logging, workers, caching, checkpoint cadence and backends may differ."""
        d = self.to_dict()
        for k in ("num_workers", "log_every", "save_every", "compile", "backend", "loss_chunk_size",
                  "loader", "cache_mb", "skip_bad"):
            d.pop(k)
        return json.loads(json.dumps(d))

    def as_baseline(self) -> RunConfig:
        """The global-only baseline with the same budget: every stage keeps its length, image
        size, lr and freezing; region and fused losses are dropped (global weight 1 where a stage
        had no global loss)."""
        stages = []
        for s in self.stages:
            losses = {"global": s.losses.get("global", 0.0) or 1.0}
            stages.append(replace(s, losses=losses, frozen=[f for f in s.frozen if "roi" not in f]))
        return replace(self, stages=stages, baseline="global")


_STAGE_KEYS = {f.name for f in fields(Stage)}
_RUN_KEYS = {f.name for f in fields(RunConfig)} - {"stages"}


def _num(where: str, key: str, value: Any, *, integer: bool = False, positive: bool = False,
         nonneg: bool = False) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise StageFileError(f"{where}: {key} must be a number, got {value!r}")
    if integer and int(value) != value:
        raise StageFileError(f"{where}: {key} must be an integer, got {value!r}")
    if positive and not value > 0:
        raise StageFileError(f"{where}: {key} must be > 0, got {value!r}")
    if nonneg and not value >= 0:
        raise StageFileError(f"{where}: {key} must be >= 0, got {value!r}")
    return int(value) if integer else float(value)


def parse_stage(raw: Any, where: str) -> Stage:
    """Validate one stage mapping; ``where`` (file and index) prefixes every error."""
    if not isinstance(raw, dict):
        raise StageFileError(f"{where}: a stage must be a mapping, got {type(raw).__name__}")
    unknown = set(raw) - _STAGE_KEYS
    if unknown:
        raise StageFileError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_STAGE_KEYS)}")
    if "name" not in raw or not isinstance(raw["name"], str) or not raw["name"]:
        raise StageFileError(f"{where}: every stage needs a non-empty string 'name'")
    where = f"{where} ({raw['name']!r})"
    losses = raw.get("losses")
    if not isinstance(losses, dict) or not losses:
        raise StageFileError(f"{where}: 'losses' must be a non-empty mapping like {{global: 1.0}}")
    bad = set(losses) - set(LOSS_KINDS)
    if bad:
        raise StageFileError(f"{where}: unknown loss(es) {sorted(bad)}; choose from {LOSS_KINDS}")
    losses = {k: _num(where, f"losses.{k}", v, nonneg=True) for k, v in losses.items()}
    if not any(v > 0 for v in losses.values()):
        raise StageFileError(f"{where}: every loss weight is 0")
    has_e, has_s = raw.get("epochs") is not None, raw.get("steps") is not None
    if has_e == has_s:
        raise StageFileError(f"{where}: give exactly one of 'epochs' or 'steps'")
    kw: dict[str, Any] = {"name": raw["name"], "losses": losses}
    if has_e:
        kw["epochs"] = _num(where, "epochs", raw["epochs"], positive=True)
    else:
        kw["steps"] = _num(where, "steps", raw["steps"], integer=True, positive=True)
    if raw.get("image_size") is not None:
        kw["image_size"] = _num(where, "image_size", raw["image_size"], integer=True, positive=True)
    for key in ("lr", "weight_decay"):
        if raw.get(key) is not None:
            kw[key] = _num(where, key, raw[key], nonneg=True)
    for key in ("hard_negative_beta", "min_lr_ratio"):
        if key in raw:
            kw[key] = _num(where, key, raw[key], nonneg=True)
    if "warmup" in raw:
        w = _num(where, "warmup", raw["warmup"], nonneg=True)
        if w >= 1 and int(w) != w:
            raise StageFileError(f"{where}: warmup is a step count (int) or a fraction < 1, got {w}")
        kw["warmup"] = w
    frozen = raw.get("frozen", [])
    if isinstance(frozen, str):
        frozen = [frozen]
    if not isinstance(frozen, list) or not all(isinstance(f, str) and f for f in frozen):
        raise StageFileError(f"{where}: 'frozen' must be a list of module paths (e.g. [text, roi])")
    kw["frozen"] = list(frozen)
    if "loss" in raw:
        if raw["loss"] not in LOSS_FUNCTIONS:
            raise StageFileError(f"{where}: loss must be one of {LOSS_FUNCTIONS}, got {raw['loss']!r}")
        kw["loss"] = raw["loss"]
    if kw.get("loss") == "sigmoid" and kw.get("hard_negative_beta", 0.0) > 0:
        raise StageFileError(f"{where}: hard_negative_beta applies to the softmax loss only "
                             "(loss: sigmoid was given)")
    return Stage(**kw)


def parse_run(raw: Any, source: str = "<config>") -> RunConfig:
    """Validate a whole run mapping (the parsed YAML/TOML) into a :class:`RunConfig`."""
    if not isinstance(raw, dict):
        raise StageFileError(f"{source}: top level must be a mapping with a 'stages' list")
    unknown = set(raw) - _RUN_KEYS - {"stages"}
    if unknown:
        raise StageFileError(f"{source}: unknown key(s) {sorted(unknown)}; allowed: "
                             f"{sorted(_RUN_KEYS | {'stages'})}")
    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, list) or not stages_raw:
        raise StageFileError(f"{source}: 'stages' must be a non-empty list")
    stages = [parse_stage(s, f"{source}: stages[{i}]") for i, s in enumerate(stages_raw)]
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise StageFileError(f"{source}: stage names must be unique, got {names}")
    kw: dict[str, Any] = {}
    for key in _RUN_KEYS & set(raw):
        kw[key] = raw[key]
    cfg = RunConfig(stages=stages, **kw)
    validate_run(cfg, source)
    return cfg


def validate_run(cfg: RunConfig, source: str = "<config>") -> None:
    """Check the run-wide options (also after command-line overrides)."""
    for key in ("batch_size", "grad_accum", "image_size", "log_every", "save_every"):
        _num(source, key, getattr(cfg, key), integer=True, positive=True)
    for key in ("lr", "weight_decay", "max_grad_norm"):
        _num(source, key, getattr(cfg, key), nonneg=True)
    _num(source, "seed", cfg.seed, integer=True)
    _num(source, "num_workers", cfg.num_workers, integer=True, nonneg=True)
    _num(source, "cache_mb", cfg.cache_mb, integer=True, nonneg=True)
    if cfg.loader not in LOADERS:
        raise StageFileError(f"{source}: loader must be one of {LOADERS}, got {cfg.loader!r}")
    if not isinstance(cfg.skip_bad, bool):
        raise StageFileError(f"{source}: skip_bad must be true or false, got {cfg.skip_bad!r}")
    if cfg.group_key is not None and (not isinstance(cfg.group_key, str) or not cfg.group_key):
        raise StageFileError(f"{source}: group_key must be a record field name, got {cfg.group_key!r}")
    for key in ("test_fraction", "val_fraction"):
        v = _num(source, key, getattr(cfg, key), nonneg=True)
        if v >= 1:
            raise StageFileError(f"{source}: {key} must be in [0, 1), got {v!r}")
    if cfg.test_fraction + cfg.val_fraction >= 1:
        raise StageFileError(f"{source}: test_fraction + val_fraction must be < 1 (nothing left "
                             f"to train on), got {cfg.test_fraction} + {cfg.val_fraction}")
    scale = cfg.crop_scale
    if (not isinstance(scale, (list, tuple)) or len(scale) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in scale)
            or not 0 < scale[0] <= scale[1] <= 1):
        raise StageFileError(f"{source}: crop_scale must be [lo, hi] with 0 < lo <= hi <= 1, "
                             f"got {scale!r}")
    v = _num(source, "flip_p", cfg.flip_p, nonneg=True)
    if v > 1:
        raise StageFileError(f"{source}: flip_p must be in [0, 1], got {v!r}")
    if cfg.precision not in PRECISIONS:
        raise StageFileError(f"{source}: precision must be one of {PRECISIONS}, got {cfg.precision!r}")
    if cfg.baseline not in (None, "global"):
        raise StageFileError(f"{source}: baseline must be 'global' or absent, got {cfg.baseline!r}")
    if not isinstance(cfg.model, str) or not cfg.model:
        raise StageFileError(f"{source}: model must be a model name string")
    if not isinstance(cfg.model_args, dict):
        raise StageFileError(f"{source}: model_args must be a mapping of model overrides")


def load_run(path: str | os.PathLike) -> RunConfig:
    """Read a ``.yaml``/``.yml`` or ``.toml`` stage file into a validated :class:`RunConfig`."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"stage file not found: {path}")
    ext = os.path.splitext(path)[1].lower()
    with open(path, "rb") as fh:
        data = fh.read()
    if ext == ".toml":
        try:
            raw = tomllib.loads(data.decode("utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise StageFileError(f"{path}: not valid TOML: {exc}") from None
    elif ext in (".yaml", ".yml", ".json"):
        try:
            raw = yaml.safe_load(data)
        except yaml.YAMLError as exc:
            raise StageFileError(f"{path}: not valid YAML: {exc}") from None
    else:
        raise StageFileError(f"{path}: stage files end in .yaml, .yml or .toml, got {ext!r}")
    return parse_run(raw, path)


def builtin_config(name: str) -> str:
    """Path of a stage file shipped in ``regionmed_fast/configs`` (``progressive``, ``global``,
    ``demo``, ``demo-global``)."""
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    path = os.path.join(here, f"{name}.yaml")
    if not os.path.isfile(path):
        avail = sorted(f[:-5] for f in os.listdir(here) if f.endswith(".yaml")) if os.path.isdir(here) else []
        raise FileNotFoundError(f"no built-in stage file {name!r}; available: {avail}")
    return path
