"""Builds eefast._C with CMake (see CMakeLists.txt).

Environment knobs:
  EEFAST_USE_CUDA=0|1   build the CUDA kernels into _C (default: 1 when torch has CUDA and
                        nvcc is found, else 0). The CPU kernels are always built.
  DEBUG=1               -O0 -g build.
  MAX_JOBS=N            parallel compile jobs (nvcc jobs are memory hungry; keep it low).
  CMAKE_ARGS="..."      extra arguments passed to the CMake configure step.
"""

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _cuda_wanted() -> bool:
    import torch  # build-time requirement, see pyproject.toml

    flag = os.environ.get("EEFAST_USE_CUDA")
    if flag is not None:
        return flag == "1"
    return torch.version.cuda is not None and shutil.which("nvcc") is not None


class CMakeExtension(Extension):
    def __init__(self, name: str):
        # py_limited_api: one abi3 .so serves every CPython >= 3.10 for a given torch;
        # csrc/registration.cpp defines PyInit__C against the limited API.
        super().__init__(name, sources=[], py_limited_api=True)


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import torch

        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        config = "Debug" if os.environ.get("DEBUG") == "1" else "Release"
        # A fixed build tree (not pip's throwaway temp dir) keeps rebuilds incremental.
        build_dir = ROOT / "build" / f"cmake-{config.lower()}"
        args = [
            f"-DCMAKE_BUILD_TYPE={config}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={target.parent}",
            f"-DEEFAST_MODULE_SUFFIX={target.name[len('_C'):]}",
            f"-DEEFAST_PYTHON_EXECUTABLE={sys.executable}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DEEFAST_USE_CUDA={'ON' if _cuda_wanted() else 'OFF'}",
        ]
        if shutil.which("ninja"):
            args.append("-GNinja")
        if shutil.which("ccache"):
            args.append("-DCMAKE_CXX_COMPILER_LAUNCHER=ccache")
        args += shlex.split(os.environ.get("CMAKE_ARGS", ""))
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))

        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        subprocess.run(
            ["cmake", "--build", str(build_dir), "--config", config, "-j", jobs], check=True
        )


setup(
    ext_modules=[CMakeExtension("eefast._C")],
    cmdclass={"build_ext": CMakeBuild},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
