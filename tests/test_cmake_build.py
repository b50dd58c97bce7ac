"""CMakeLists.txt builds the same csrc/ as setup.py, and its C++ test passes (slow: ~2 min)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch.utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_cmake_build_and_ctest(tmp_path):
    env = dict(os.environ)
    # Without it torch's CMake config tries to detect a GPU with a CUDA20 try_run and fails.
    env.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    # A CUDA build of torch makes find_package(Torch) look for the toolkit (see ENV-NOTES).
    args = [f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", f"-DPython_EXECUTABLE={sys.executable}"]
    if os.path.isdir("/usr/local/cuda"):
        args.append("-DCUDA_TOOLKIT_ROOT_DIR=/usr/local/cuda")
        site = os.path.dirname(os.path.dirname(torch.__file__))
        nvrtc = os.path.join(site, "nvidia", "cu13", "lib", "libnvrtc.so.13")
        if os.path.exists(nvrtc):
            args.append(f"-DCUDA_nvrtc_LIBRARY={nvrtc}")
    build = tmp_path / "build"
    cfg = subprocess.run(["cmake", "-S", REPO, "-B", str(build), *args], capture_output=True, text=True, env=env)
    assert cfg.returncode == 0, cfg.stdout[-3000:] + cfg.stderr[-3000:]
    jobs = str(os.cpu_count() or 2)
    bld = subprocess.run(["cmake", "--build", str(build), "-j", jobs], capture_output=True, text=True, env=env)
    assert bld.returncode == 0, bld.stdout[-3000:] + bld.stderr[-3000:]
    test = subprocess.run(["ctest", "--test-dir", str(build), "--output-on-failure"], capture_output=True,
                          text=True, env=env)
    assert test.returncode == 0, test.stdout[-4000:] + test.stderr[-2000:]
