"""``python -m regionmed_fast.info``: which backends can run here, and why others cannot."""
from __future__ import annotations

import json
import platform
import sys

import torch

from regionmed_fast import __version__, _ext
from regionmed_fast.ops import _backend


def collect() -> dict:
    """Versions, devices and per-device backend availability as a JSON-able dict."""
    mod, reason = _ext.load()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    info = {
        "regionmed_fast": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "extension": "loaded" if mod is not None else reason,
        "extension_cuda_kernels": _ext.has_cuda_kernels(),
        "openmp_threads": mod.openmp_max_threads() if mod is not None else None,
        "triton_interpret": _backend.triton_interpret(),
        "ops": {op: {**t.describe(), "status": {d: t.report(d) for d in devices}}
                for op, t in _backend.all_tables().items()},
    }
    try:  # optional; imported only here for its cost (docs/roi.md, "Import cost")
        import triton

        info["triton"] = triton.__version__
    except Exception as exc:  # pragma: no cover - depends on the install
        info["triton"] = f"missing ({exc})"
    if not torch.cuda.is_available():
        info["cuda"] = "no CUDA device visible to torch: every op's cuda/triton backends are off"
    return info


def print_report() -> None:
    """Print :func:`collect` as aligned text, one block per op and backend."""
    info = collect()
    ops = info.pop("ops")
    width = max(len(k) for k in info)
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
    for op, table in ops.items():
        aliases = ", ".join(f"{a} = {t}" for a, t in table["aliases"].items())
        auto = "; ".join(f"on {d}: {' > '.join(v)}" for d, v in table["auto"].items())
        print(f"\n{op}: auto {auto}" + (f"; aliases {aliases}" if aliases else ""))
        for name, b in table["backends"].items():
            print(f"  {name:<12} {b['provider']}")
            for device, status in table["status"].items():
                print(f"  {'':<12}   on {device}: {status[name]}")


def info_main(argv: list[str]) -> int:
    """``regionmed-fast info`` (``--json`` for machine-readable output)."""
    if "--json" in argv:
        print(json.dumps(collect(), indent=2))
    else:
        print_report()
    return 0


if __name__ == "__main__":
    info_main(sys.argv[1:])
