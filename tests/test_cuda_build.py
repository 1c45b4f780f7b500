"""The CUDA code compiles, on any machine with nvcc, GPU or not.

- every csrc/<op>/*.cu builds for sm_80 and sm_90a (the standalone csrc/CMakeLists.txt);
- the CUDA dispatch glue (csrc/<op>/cuda.cpp) passes a syntax check against torch's headers when
  this torch is CPU-only (with a CUDA torch it is compiled into eefast._C for real).
"""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
NVCC = shutil.which("nvcc")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(NVCC is None, reason="nvcc not found"),
    pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not found"),
]


def cuda_include_dir() -> Path:
    """The toolkit's include dir: $CUDA_HOME, else where nvcc says its toolkit is."""
    if os.environ.get("CUDA_HOME"):
        return Path(os.environ["CUDA_HOME"]) / "include"
    dry = subprocess.run([NVCC, "--dryrun", "-x", "cu", os.devnull], capture_output=True, text=True)
    top = next(line.split("TOP=", 1)[1] for line in dry.stderr.splitlines() if "TOP=" in line)
    return Path(top.strip()).resolve() / "include"


def test_cuda_kernels_compile_for_sm80_and_sm90a(tmp_path):
    assert importlib.util.find_spec("cutlass_library"), "pip install --no-deps nvidia-cutlass"
    env = {k: v for k, v in os.environ.items() if k != "TORCH_CUDA_ARCH_LIST"}
    build = tmp_path / "cuda"
    cfg = subprocess.run(
        [
            "cmake",
            "-S",
            str(ROOT / "csrc"),
            "-B",
            str(build),
            f"-DEEFAST_PYTHON_EXECUTABLE={sys.executable}",
        ]
        + (["-GNinja"] if shutil.which("ninja") else []),
        capture_output=True,
        text=True,
        env=env,
    )
    assert cfg.returncode == 0, cfg.stdout + cfg.stderr
    jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
    out = subprocess.run(
        ["cmake", "--build", str(build), "-j", jobs, "--verbose"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-5000:]
    for arch in (
        "arch=compute_80,code=[compute_80,sm_80]",
        "arch=compute_90a,code=[compute_90a,sm_90a]",
    ):
        assert arch in out.stdout, f"{arch} missing from the nvcc command lines"
    for cu in sorted((ROOT / "csrc").rglob("*.cu")):
        name = cu.relative_to(ROOT / "csrc")
        assert f"{name}.o" in out.stdout, f"{name} was not compiled"
    assert (build / "libeefast_cuda_kernels.a").exists()


@pytest.mark.skipif(torch.version.cuda is not None, reason="a CUDA torch builds the glue for real")
@pytest.mark.parametrize(
    "glue", sorted(str(p.relative_to(ROOT / "csrc")) for p in (ROOT / "csrc").glob("*/cuda.cpp"))
)
def test_cuda_glue_syntax(tmp_path, glue):
    # The CPU wheel ships ATen/c10 CUDA headers but not this generated one (a build flag only).
    stub = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stub.parent.mkdir(parents=True)
    stub.write_text("#pragma once\n")
    torch_inc = Path(torch.__file__).parent / "include"
    cuda_inc = cuda_include_dir()
    assert (cuda_inc / "cuda_runtime.h").exists(), cuda_inc
    cmd = [
        os.environ.get("CXX", "c++"),
        "-std=c++20",
        "-fsyntax-only",
        "-Wall",
        "-Werror",
        "-Wno-unused-parameter",
        "-DTORCH_ASSERT_ONLY_METHOD_OPERATORS",
        f"-I{ROOT / 'csrc'}",
        f"-I{tmp_path}",
        f"-isystem{torch_inc}",
        f"-isystem{torch_inc / 'torch' / 'csrc' / 'api' / 'include'}",
        f"-isystem{cuda_inc}",
        str(ROOT / "csrc" / glue),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-5000:]
