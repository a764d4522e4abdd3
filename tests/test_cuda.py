"""Every op on CUDA tensors against the float64 reference: the `cuda` parametrisation of
the suite (issue 17). Without a GPU every test here is reported as skipped, never as
passed. benchmarks/gpu_check.sh runs this file on a GPU.

FASTGEN_TEST_CUDA_DEVICE=cpu runs the same tests on CPU tensors through the Triton
backend under TRITON_INTERPRET=1 (what a GPU would run, interpreted): a check of this
file itself on a machine without a GPU, not a GPU result.
"""
import os

import pytest
import torch

from conftest import DTYPES
from fastgen.ops import _backend, ball_count, fold_patches, knn, nearest_code, patch_nn, reference, reparameterize
from helpers import assert_close, assert_equal_idx, assert_knn_equivalent, image_patches

DEVICE = os.environ.get("FASTGEN_TEST_CUDA_DEVICE", "cuda")
RUNS = (torch.cuda.is_available() if DEVICE == "cuda"
        else DEVICE == "cpu" and _backend.triton_runs_on(torch.device("cpu")))
pytestmark = pytest.mark.skipif(not RUNS, reason="needs a CUDA GPU (or FASTGEN_TEST_CUDA_DEVICE=cpu under TRITON_INTERPRET=1)")
# on a GPU "auto" must pick triton by itself; on the CPU stand-in it is named
BACKEND = "auto" if DEVICE == "cuda" else "triton"
# shapes: odd sizes, tile edges; the interpreter gets the small ones
SHAPES = [(1, 1, 1), (7, 5, 3), (33, 70, 17)] + ([(257, 1030, 64), (1000, 3000, 147)] if DEVICE == "cuda" else [])


def dev(*ts):
    return [t.to(DEVICE) for t in ts]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("kk", [1, 4, 17])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_knn(shape, dtype, tol, kk, precision):
    n, m, d = shape
    kk = min(kk, m)
    q, k = torch.randn(n, d).to(dtype), torch.randn(m, d).to(dtype)
    dist, idx = knn(*dev(q, k), kk, backend=BACKEND, precision=precision)
    assert dist.device.type == DEVICE and idx.device.type == DEVICE
    ref_d, ref_i = reference.knn_exact(q, k, kk)
    # certified in both precisions (k <= 128): the float64 answer
    assert_equal_idx(idx.cpu(), ref_i)
    assert_close(dist.cpu(), ref_d, 1e-6, 1e-6)


def test_knn_above_the_screens_k():
    from fastgen.ops.knn import SCREEN_MAX_K       # above it: the plain kernel, fp32 ranking
    q, k = torch.randn(9, 6), torch.randn(140, 6)
    dist, idx = knn(*dev(q, k), SCREEN_MAX_K + 3, backend=BACKEND)
    assert_knn_equivalent(q, k, dist.cpu(), idx.cpu(), reference.knn_exact(q, k, SCREEN_MAX_K + 3)[0], rtol=1e-4)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_knn_exclude_self_batches_far_from_origin(precision):
    x = torch.randn(3, 40, 9) + 1000
    dist, idx = knn(*dev(x, x), 3, exclude_self=True, backend=BACKEND, precision=precision)
    ref_d, ref_i = reference.knn_exact(x, x, 3, exclude_self=True)
    assert_knn_equivalent(x, x, dist.cpu(), idx.cpu(), ref_d, rtol=1e-4)
    assert_equal_idx(idx.cpu(), ref_i)


def test_knn_ties_and_gradients():
    x = torch.randint(0, 3, (45, 3)).float()
    dist, idx = knn(*dev(x, x), 6, exclude_self=True, backend=BACKEND)
    assert_equal_idx(idx.cpu(), reference.knn_exact(x, x, 6, exclude_self=True)[1])
    q = torch.randn(15, 6, device=DEVICE, requires_grad=True)
    k = torch.randn(25, 6, device=DEVICE, requires_grad=True)
    for precision in ("fp32", "bf16"):
        dist, idx = knn(q, k, 3, backend=BACKEND, precision=precision)
        gq, gk = torch.autograd.grad(dist.sum(), [q, k])
        q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
        rq, rk = torch.autograd.grad((q64[:, None] - k64[idx]).square().sum(), [q64, k64])
        assert_close(gq.cpu(), rq.cpu(), 1e-5, 1e-5)
        assert_close(gk.cpu(), rk.cpu(), 1e-5, 1e-5)


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_nearest_code(dtype, tol, precision):
    x, cb = torch.randn(300, 64).to(dtype), torch.randn(129, 64).to(dtype)
    res = nearest_code(*dev(x, cb), backend=BACKEND, precision=precision)
    ref_i, ref_d = reference.nearest_code_exact(x, cb)
    assert_close(res.dist.cpu(), ref_d, tol, tol)
    assert_equal_idx(res.idx.cpu(), ref_i)


@pytest.mark.parametrize("alpha", [0.005 * 147, None])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_patch_nn(alpha, precision):
    keys = image_patches((20, 26) if DEVICE == "cpu" else (60, 90))
    queries = keys + 0.05 * torch.randn_like(keys)
    got = patch_nn(*dev(queries, keys), alpha, backend=BACKEND, precision=precision).cpu()
    want, scores, best = reference.patch_nn_exact(queries, keys, alpha)
    if precision == "bf16" or alpha is None:     # screened and re-ranked in float64: the optimum itself
        assert_equal_idx(got, want)
    else:                       # fp32 scores: within fp32's reach of the optimum
        from helpers import fp32_allowance
        reached = scores.gather(1, got[:, None])[:, 0]
        assert (reached <= best + fp32_allowance(queries, keys, alpha)).all()


def test_ball_count():
    p, c = torch.randn(200, 33), torch.randn(40, 33)
    r = reference.sqdist_exact(c, c).float().kthvalue(3, 1).values
    out = ball_count(*dev(p, c, r), backend=BACKEND)
    want_count, _, want_idx = reference.ball_count_exact(p, c, r)
    assert_equal_idx(out.count.cpu().long(), want_count.long())
    assert_equal_idx(out.idx.cpu(), want_idx)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fold_patches(dtype):
    src = torch.rand(2, 3, 21, 30).to(dtype)
    idx = torch.randint(0, 15 * 24, (2, 17, 11))
    out = fold_patches(*dev(src, idx), 7, backend=BACKEND)
    want = reference.fold_patches_reference(src, idx, 7)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert out.dtype == dtype and out.device.type == DEVICE
    assert_close(out.cpu(), want, tol, tol)
    # the Triton fold has no backward (GPNN folds detached images): it says so
    with pytest.raises(ValueError, match="not differentiable"):
        fold_patches(src.to(DEVICE).requires_grad_(), idx.to(DEVICE), 7, backend="triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reparameterize_and_gradient(dtype):
    mu, lv, eps = (torch.randn(33, 70).to(dtype) for _ in range(3))
    m, l, e = dev(mu, lv, eps)
    m.requires_grad_()
    l.requires_grad_()
    z, kl = reparameterize(m, l, e, backend=BACKEND)
    zr, klr = reference.reparameterize_reference(mu, lv, eps)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert_close(z.detach().cpu(), zr, tol, tol)
    assert_close(kl.detach().cpu(), klr, tol, tol)
    gm, gl = torch.autograd.grad(z.float().sum() + kl.sum(), [m, l])
    m64, l64 = mu.double().requires_grad_(), lv.double().requires_grad_()
    zr, klr = reference.reparameterize_reference(m64, l64, eps)
    rm, rl = torch.autograd.grad(zr.sum() + klr.sum(), [m64, l64])
    assert_close(gm.cpu(), rm, tol * 10, tol * 10)
    assert_close(gl.cpu(), rl, tol * 10, tol * 10)


def test_vector_quantizer_layer():
    from fastgen.nn import VectorQuantizer
    torch.manual_seed(0)
    vq = VectorQuantizer(64, 16, backend=BACKEND).to(DEVICE)
    x = torch.randn(8, 5, 16, device=DEVICE, requires_grad=True)
    out = vq(x)
    codes = vq._codes().detach().cpu()
    ref_q, ref_i, commit, cb_loss, _ = reference.vector_quantize_reference(x.detach().cpu().reshape(-1, 16), codes)
    assert_equal_idx(out.indices.cpu().reshape(-1), ref_i)
    assert_close(out.quantized.detach().cpu().reshape(-1, 16), ref_q, 1e-6, 1e-6)
    (out.quantized.sum() + sum(out.losses.values())).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_gpnn_sample():
    from fastgen.metrics import patch_fidelity
    from fastgen.models import GPNN
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 24), torch.linspace(0, 1, 30), indexing="ij")
    x = torch.stack([yy, xx, ((yy * 4).floor() + (xx * 5).floor()) % 2])     # ramps and a checkerboard
    y = GPNN(coarsest_side=12, iterations=2, backend=BACKEND).sample(x.to(DEVICE), 2, seed=0, progress=False)
    assert y.shape == (2, 3, 24, 30) and y.device.type == DEVICE
    assert bool(((y >= 0) & (y <= 1)).all())
    # made of the source's patches: each output patch near some source patch (about 0.01
    # under the interpreter; uniform noise scores ~0.15, the mirrored source ~0.015)
    noise = patch_fidelity(torch.rand_like(x), x)
    assert all(patch_fidelity(t.cpu(), x) < 0.2 * noise for t in y)
