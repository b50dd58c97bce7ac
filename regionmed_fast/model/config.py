"""``RegionMedConfig``: everything that shapes a RegionMedCLIP, as a JSON-able dataclass."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .proposer import ProposerConfig
from .roi_processor import RoIConfig
from .text import TextConfig
from .vit import VisionConfig

_NESTED = {"vision": VisionConfig, "text": TextConfig, "roi": RoIConfig,
           "proposer": ProposerConfig}


@dataclass
class RegionMedConfig:
    """Everything that shapes a RegionMedCLIP. ``use_roi=False`` is the global-only baseline
    (no RoI processor: same towers, same projections). ``proposer`` holds the defaults of the
    annotation-free region proposer (``encode_image(images, boxes="auto")``)."""
    name: str = "regionmed-tiny"
    embed_dim: int = 256
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    roi: RoIConfig = field(default_factory=RoIConfig)
    proposer: ProposerConfig = field(default_factory=ProposerConfig)
    use_roi: bool = True
    init_logit_scale: float = math.log(1 / 0.07)
    init_logit_bias: float | None = None  # a float adds a learnable bias (SigLIP uses -10)
    max_logit_scale: float = 100.0
    # The input size the weights were last trained at (the trainer sets it from the last
    # stage); evaluation resizes images to it. None: the vision config's image_size.
    trained_image_size: int | None = None

    @property
    def eval_image_size(self) -> int:
        """The size to feed at inference: ``trained_image_size``, else ``vision.image_size``."""
        return int(self.trained_image_size or self.vision.image_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> "RegionMedConfig":
        """Build from a (possibly partial) dict; unknown keys are an error naming them."""
        check_keys(d, cls, where)
        kw = {}
        for k, v in d.items():
            if k in _NESTED:
                if isinstance(v, _NESTED[k]):
                    kw[k] = v
                    continue
                if not isinstance(v, dict):
                    raise ValueError(f"{where}.{k} must be a dict, got {type(v).__name__}")
                check_keys(v, _NESTED[k], f"{where}.{k}")
                try:
                    kw[k] = _NESTED[k](**v)
                except ValueError as e:
                    raise ValueError(f"{where}.{k}: {e}") from None
            else:
                kw[k] = v
        return cls(**kw)


def check_keys(d: dict, cls, where: str) -> None:
    """Unknown keys of ``d`` for the dataclass ``cls`` are an error naming them."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown} (known: {sorted(known)})")


def config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """``"key: a (checkpoint) vs b (model)"`` for every leaf that differs."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} (checkpoint) vs {vb!r} (model)")
    return out
