"""Which parameters a stage trains: ``frozen`` names modules by path, not by string prefix.

``frozen: [text]`` freezes the parameters of ``model.text`` (the text tower) and nothing else:
``text_proj`` is a sibling module, not part of ``text``, and keeps training. An entry is a
module path as ``model.get_submodule`` reads it (``visual``, ``visual.blocks.0``, ``roi``) or a
parameter's full name (``logit_scale``, ``text_proj.weight``).
"""
from __future__ import annotations

import torch

from regionmed_fast.train.stages import StageFileError


def frozen_parameter_names(model: torch.nn.Module, frozen: list[str], *, stage: str = "",
                           missing_ok: tuple[str, ...] = ()) -> set[str]:
    """Names (as ``model.named_parameters()`` gives them) of the parameters ``frozen`` covers.

    An entry that is neither a module path nor a parameter name is a :class:`StageFileError`
    listing the top-level modules, unless it starts with one of ``missing_ok`` (the global-only
    baseline has no ``roi`` to freeze).
    """
    names = [n for n, _ in model.named_parameters()]
    out: set[str] = set()
    for path in frozen:
        key = path.rstrip(".")
        inside = [n for n in names if n == key or n.startswith(key + ".")]
        if not inside and not _is_module(model, key):
            if any(key == m or key.startswith(m + ".") for m in missing_ok):
                continue
            tops = sorted({n.split(".")[0] for n in names})
            raise StageFileError(f"stage {stage!r}: frozen entry {path!r} is no module path or "
                                 f"parameter name of the model; its top-level modules and "
                                 f"parameters are {tops}")
        out.update(inside)
    return out


def _is_module(model: torch.nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def apply_freeze(model: torch.nn.Module, frozen: list[str], *, stage: str = "",
                 missing_ok: tuple[str, ...] = ()) -> list[str]:
    """Set ``requires_grad`` for one stage: False on what ``frozen`` covers, True elsewhere.
    Returns the names of the parameters that train, in ``named_parameters()`` order."""
    off = frozen_parameter_names(model, frozen, stage=stage, missing_ok=missing_ok)
    trained = []
    for n, p in model.named_parameters():
        p.requires_grad_(n not in off)
        if n not in off:
            trained.append(n)
    return trained
