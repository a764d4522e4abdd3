"""fastgen.ops.fold_patches against the unfold/gather/fold reference in float64."""
import pytest
import torch

from fastgen.ops import fold_patches, reference
from helpers import assert_close


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1, 1, 1), (2, 3, 9, 11, 5, 7, 3), (1, 3, 20, 17, 14, 25, 7)])
def test_matches_reference(backend, dtype, tol, shape):
    B, C, Hs, Ws, Hq, Wq, p = shape
    src = torch.rand(B, C, Hs, Ws).to(dtype)
    nsrc = (Hs - p + 1) * (Ws - p + 1)
    idx = torch.randint(0, nsrc, (B, Hq, Wq))
    out = fold_patches(src, idx, p, backend=backend)
    assert out.shape == (B, C, Hq + p - 1, Wq + p - 1) and out.dtype == dtype
    assert_close(out, reference.fold_patches_reference(src, idx, p), tol, tol)


def test_identity_choice_reproduces_the_source():
    src = torch.rand(3, 12, 15)
    p = 5
    Hq, Wq = 12 - p + 1, 15 - p + 1
    idx = torch.arange(Hq * Wq).view(Hq, Wq)  # every query copies its own position
    assert_close(fold_patches(src, idx, p), src, 1e-6, 1e-6)


def test_opcheck():
    src = torch.rand(1, 2, 8, 9)
    idx = torch.randint(0, 4 * 5, (1, 6, 3))
    torch.library.opcheck(torch.ops.fastgen.fold_patches.default, (src, idx, 5),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("call,exc,msg", [
    (lambda: fold_patches(torch.rand(3, 8, 8), torch.zeros(2, 2, dtype=torch.long), 9), ValueError, "smaller than one patch"),
    (lambda: fold_patches(torch.rand(3, 8, 8), torch.full((2, 2), 999), 3), ValueError, "idx values"),
    (lambda: fold_patches(torch.rand(3, 8, 8), torch.full((2, 2), -1), 3), ValueError, "idx values"),
    (lambda: fold_patches(torch.rand(3, 8, 8), torch.zeros(2, 2), 3), TypeError, "idx must be int64"),
    (lambda: fold_patches(torch.rand(8, 8), torch.zeros(2, 2, dtype=torch.long), 3), ValueError, "source must be"),
    (lambda: fold_patches(torch.rand(3, 8, 8), torch.zeros(2, dtype=torch.long), 3), ValueError, "idx must be 2-D"),
    (lambda: fold_patches(torch.rand(3, 8, 8), torch.zeros(2, 2, dtype=torch.long), 0), ValueError, "patch_size"),
    (lambda: fold_patches(torch.rand(3, 8, 8), torch.zeros(0, 3, dtype=torch.long), 2), ValueError, "empty query grid"),
    (lambda: fold_patches(torch.rand(3, 8, 8), torch.zeros(2, 2, dtype=torch.long, device="meta"), 2), ValueError, "idx is on meta"),
    (lambda: fold_patches(torch.rand(3, 8, 8, requires_grad=True), torch.zeros(2, 2, dtype=torch.long), 2), ValueError, "not differentiable"),
])
def test_bad_inputs(call, exc, msg):
    with pytest.raises(exc, match=msg):
        call()


def test_raw_op_checks_the_query_grid_and_devices():
    with pytest.raises(ValueError, match="empty query grid"):
        torch.ops.fastgen.fold_patches(torch.rand(1, 1, 4, 4), torch.zeros(1, 0, 3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="one device"):
        torch.ops.fastgen.fold_patches(torch.rand(1, 1, 4, 4), torch.zeros(1, 2, 2, dtype=torch.long, device="meta"), 2)
