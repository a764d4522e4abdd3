"""fastgen.ops.nearest_code (the VQ lookup) against the float64 ground truth."""
import pytest
import torch

from fastgen.ops import nearest_code, reference
from conftest import DTYPES, backends
from helpers import assert_close, assert_equal_idx


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1), (37, 5, 3), (300, 129, 64)])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_matches_float64_reference(backend, dtype, tol, shape, precision):
    n, kk, d = shape
    if backend == "triton":
        n, kk = min(n, 40), min(kk, 33)
    x = torch.randn(n, d).to(dtype)
    cb = torch.randn(kk, d).to(dtype)
    if precision == "bf16" and backend == "torch":   # a bf16 cross term exists in C++ and Triton only
        with pytest.raises(ValueError, match="runs on the cpp and triton backends only"):
            nearest_code(x, cb, backend=backend, precision=precision)
        return
    dist, idx = nearest_code(x, cb, backend=backend, precision=precision)
    ref_i, ref_d = reference.nearest_code_exact(x, cb)
    assert idx.shape == (n,) and dist.shape == (n,) and idx.dtype == torch.long
    assert_close(dist, ref_d, tol, tol)
    if backend == "cpp" or precision == "bf16":   # the certified paths: the float64 answer
        assert_equal_idx(idx, ref_i)


@pytest.mark.parametrize("backend", backends())
def test_duplicate_codes_tie_to_lowest_index(backend):
    cb = torch.randint(-2, 3, (10, 4)).float()
    cb = torch.cat([cb, cb])  # codes 10..19 duplicate 0..9
    x = cb[torch.randint(0, 20, (64,))]
    dist, idx = nearest_code(x, cb, backend=backend)
    ref_i, _ = reference.nearest_code_exact(x, cb)
    assert_equal_idx(idx, ref_i)
    assert (idx < 10).all() and (dist == 0).all()


def test_far_from_origin_codebook():
    cb = torch.randn(256, 32) + 1000
    x = cb[torch.randint(0, 256, (500,))] + 1e-3 * torch.randn(500, 32)
    dist, idx = nearest_code(x, cb)
    ref_i, ref_d = reference.nearest_code_exact(x, cb)
    assert_equal_idx(idx, ref_i)
    assert_close(dist, ref_d, 1e-5, 1e-9)


def test_gradient_of_distance():
    x = torch.randn(20, 6, requires_grad=True)
    cb = torch.randn(9, 6, requires_grad=True)
    dist, idx = nearest_code(x, cb)
    gx, gc = torch.autograd.grad(dist.sum(), [x, cb])
    x64, c64 = x.detach().double().requires_grad_(), cb.detach().double().requires_grad_()
    rx, rc = torch.autograd.grad((x64 - c64[idx]).square().sum(), [x64, c64])
    assert_close(gx, rx, 1e-5, 1e-5)
    assert_close(gc, rc, 1e-5, 1e-5)


def test_opcheck():
    # (dist, idx): the float output first, so every opcheck test applies (AOT dispatch too)
    x = torch.randn(13, 5, requires_grad=True)
    cb = torch.randn(7, 5)
    torch.library.opcheck(torch.ops.fastgen.nearest_code.default, (x, cb, "fp32"))
    torch.library.opcheck(torch.ops.fastgen.nearest_code.default, (x.detach(), cb, "bf16"))


@pytest.mark.parametrize("backend", backends())
def test_result_is_named_in_knns_order(backend):
    from fastgen.ops import knn
    x, cb = torch.randn(11, 4), torch.randn(6, 4)
    res = nearest_code(x, cb, backend=backend)
    ref = knn(x, cb, 1, backend=backend)
    assert res._fields == ref._fields == ("dist", "idx")
    assert_equal_idx(res.idx, ref.idx[:, 0])
    assert torch.equal(res.dist, ref.dist[:, 0])


@pytest.mark.parametrize("call,exc,msg", [
    (lambda: nearest_code(torch.randn(5, 3), torch.randn(4, 2)), ValueError, "D=3"),
    (lambda: nearest_code(torch.randn(5, 3), torch.randn(0, 3)), ValueError, "codebook is empty"),
    (lambda: nearest_code(torch.randn(2, 5, 3), torch.randn(4, 3)), ValueError, "x must be 2-D"),
    (lambda: nearest_code(torch.randn(5, 3), torch.randn(4, 3).half()), TypeError, "codebook is torch.float16"),
    (lambda: nearest_code(torch.randn(5, 3), torch.randn(4, 3).int()), TypeError, "codebook must be float"),
    (lambda: nearest_code(torch.full((5, 3), float("nan")), torch.randn(4, 3)), ValueError, "x contains NaN"),
    (lambda: nearest_code(torch.randn(5, 3), torch.full((4, 3), float("inf"))), ValueError, "codebook contains NaN"),
])
def test_bad_inputs(call, exc, msg):
    with pytest.raises(exc, match=msg):
        call()
