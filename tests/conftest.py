"""Shared test set-up.

Triton kernels run here under the interpreter on CPU tensors: the variable must be
set before triton decorates any kernel, so it is set before fastgen is imported.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# the digits classifier (fastgen.metrics.digit_features) caches its weights: tests keep
# the cache in a folder of their own, trained once per session, never in the user's
import tempfile  # noqa: E402
os.environ["FASTGEN_CACHE"] = tempfile.mkdtemp(prefix="fastgen-test-cache-")

import pytest  # noqa: E402

from fastgen.ops import _backend  # noqa: E402


def backends():
    """Every backend that can run the suite's CPU tensors; triton under the interpreter.
    (On a GPU machine the interpreter is off and triton cannot take CPU tensors: there
    tests/test_cuda.py runs every op on CUDA tensors instead.)"""
    out = ["cpp", "torch"]
    if _backend.triton_runs_on(torch.device("cpu")):
        out.append("triton")
    return out


DTYPES = [  # dtype, the float64-ground-truth tolerance on returned distances (rel)
    (torch.float32, 1e-5),
    (torch.float16, 1e-5),
    (torch.bfloat16, 1e-5),
]


@pytest.fixture(autouse=True)
def _fresh_seed():
    # fresh random inputs each run, but printable when a test fails
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    yield seed
