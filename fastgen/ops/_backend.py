"""Backend choice shared by every op: "auto" | "cpp" | "triton" | "torch"."""
import importlib.util
import os

import torch

from fastgen import _ext

BACKENDS = ("auto", "cpp", "triton", "torch")


def triton_available():
    return importlib.util.find_spec("triton") is not None


def triton_runs_on(device):
    """Triton kernels run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1."""
    if not triton_available():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def resolve(backend, device, precision="fp32", bf16_backends=("cpp", "triton")):
    """The concrete backend for tensors on `device`, or a ValueError naming `backend`.
    precision="bf16" (a bf16 cross term, certified exact: the C++ engine, or the Triton
    screen of fastgen/ops/certified.py) exists on `bf16_backends` only: asking another
    backend for it raises instead of being ignored."""
    be = _resolve(backend, device)
    if precision != "fp32" and be not in bf16_backends:
        where = " and ".join(bf16_backends)
        raise ValueError(f"precision={precision!r} runs on the {where} backend{'s' if len(bf16_backends) > 1 else ''} only; "
                         f"backend {be!r} computes in fp32: use precision='fp32'")
    return be


def _resolve(backend, device):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"fastgen ops run on CPU or CUDA tensors, got tensors on {device}")
    if backend == "auto":
        if device.type == "cuda" and triton_available():
            return "triton"
        if device.type == "cpu" and _ext.CPP_AVAILABLE:
            return "cpp"
        if device.type == "cpu":
            _ext.warn_fallback_once()
        return "torch"
    if backend == "cpp":
        if not _ext.CPP_AVAILABLE:
            raise RuntimeError(f"backend='cpp' requested but the extension is missing: {_ext.CPP_ERROR}")
        if device.type != "cpu":
            raise ValueError(f"backend='cpp' runs on CPU tensors, got tensors on {device}")
    if backend == "triton" and not triton_runs_on(device):
        raise RuntimeError(
            "backend='triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1) "
            f"and triton installed; got tensors on {device}, triton installed: {triton_available()}")
    return backend
