"""Build of fastgen's C++ kernels (fastgen._C).

Build with the torch that is already installed (`pip install -e . --no-build-isolation`):
an isolated build would download a second, multi-GB torch.
"""
import glob
import os
import shutil

from setuptools import setup

import torch
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
CXX_FLAGS = ["-O3", "-fopenmp", "-std=c++17", "-Wall", "-Wno-unknown-pragmas"]


def sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def with_cuda():
    # CUDA kernels only when a CUDA torch, nvcc and .cu sources are all present;
    # FASTGEN_NO_CUDA=1 forces the CPU-only build.
    if os.environ.get("FASTGEN_NO_CUDA") == "1":
        return False
    return (torch.version.cuda is not None and shutil.which("nvcc") is not None
            and bool(sources("csrc/cuda/*.cu")))


def extension():
    srcs = sources("csrc/*.cpp") + sources("csrc/cpu/*.cpp")
    macros = [("FASTGEN_CXX_FLAGS", '"' + " ".join(CXX_FLAGS) + '"')]
    if with_cuda():
        return CUDAExtension(
            "fastgen._C", srcs + sources("csrc/cuda/*.cu"),
            define_macros=macros + [("WITH_CUDA", None)],
            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": ["-O3"]},
            extra_link_args=["-fopenmp"])
    return CppExtension("fastgen._C", srcs, define_macros=macros,
                        extra_compile_args=CXX_FLAGS, extra_link_args=["-fopenmp"])


# FASTGEN_SKIP_EXT=1: install the package (and its dependencies) without compiling; the
# Makefile builds the extension in place with `setup.py build_ext --inplace`, in the
# persistent build/ folder, so a second build recompiles only what changed.
SKIP = os.environ.get("FASTGEN_SKIP_EXT") == "1"
setup(ext_modules=[] if SKIP else [extension()], cmdclass={"build_ext": BuildExtension})
