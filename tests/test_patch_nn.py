"""fastgen.ops.patch_nn against the float64 ground truth.

Natural patches are full of near-ties, so a choice is judged by the score it reaches
against the float64 optimum (within an fp32 error allowance), and by index equality
only where the best score beats the runner-up by more than that allowance.
"""
import pytest
import torch

from conftest import backends
from fastgen.ops import patch_nn, reference
from helpers import assert_equal_idx, fp32_allowance, image_patches
from helpers import judge  # noqa: F401  (tests/test_gpnn.py imports judge from here)

BACKENDS = backends()  # triton where it runs (under TRITON_INTERPRET=1 on this machine)


def check_scores(q, k, alpha, idx):
    ref_idx, scores, best = reference.patch_nn_exact(q, k, alpha)
    reached = scores.gather(1, idx[:, None])[:, 0]
    tol = fp32_allowance(q, k, alpha)
    bad = reached > best + tol
    assert not bad.any(), f"{int(bad.sum())} of {len(bad)} queries miss the optimum score by more than fp32 allows"
    # where the optimum is clear of the runner-up, the index itself must match
    top2 = scores.topk(2, dim=1, largest=False).values if scores.shape[1] > 1 else None
    if top2 is not None:
        clear = (top2[:, 1] - top2[:, 0]) > 2 * tol
        assert_equal_idx(idx[clear], ref_idx[clear])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha", [0.005, 1.0, None])
@pytest.mark.parametrize("shape", [(1, 1, 1), (9, 4, 3), (200, 300, 27), (130, 700, 64)])
def test_random_data_reaches_optimum(backend, alpha, shape):
    n, m, d = shape
    q = torch.randn(n, d)
    k = torch.randn(m, d)
    idx = patch_nn(q, k, alpha, backend=backend)
    assert idx.shape == (n,) and idx.dtype == torch.long
    check_scores(q, k, alpha, idx)
    if alpha is None and backend in ("cpp", "triton"):  # plain NN is the certified exact path
        assert_equal_idx(idx, reference.patch_nn_exact(q, k, None)[0])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_real_image_patches(backend, precision):
    keys = image_patches((28, 40))
    queries = keys + 0.05 * torch.randn_like(keys)  # a noisy copy, as in GPNN's coarsest level
    if precision == "bf16" and backend == "torch":    # a bf16 cross term exists in C++ and Triton only
        with pytest.raises(ValueError, match="runs on the cpp and triton backends only"):
            patch_nn(queries, keys, 0.005, backend=backend, precision=precision)
        return
    idx = patch_nn(queries, keys, 0.005, backend=backend, precision=precision)
    if precision == "fp32":
        check_scores(queries, keys, 0.005, idx)
    else:  # bf16 cross term: judged with bf16's allowance (2^-8 vs 2^-24 rounding)
        ref_idx, scores, best = reference.patch_nn_exact(queries, keys, 0.005)
        reached = scores.gather(1, idx[:, None])[:, 0]
        tol = fp32_allowance(queries, keys, 0.005) * 2.0 ** 16 / (64 * keys.shape[1])
        assert (reached <= best + tol).all()
        if backend == "triton":   # the screen re-ranks in float64: the optimum itself
            assert_equal_idx(idx, ref_idx)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(dtype):
    q = torch.randn(60, 12).to(dtype)
    k = torch.randn(80, 12).to(dtype)
    check_scores(q.float(), k.float(), 0.01, patch_nn(q, k, 0.01))


def test_batched_equals_per_batch():
    q = torch.randn(3, 50, 10)
    k = torch.randn(3, 70, 10)
    idx = patch_nn(q, k, 0.005)
    for b in range(3):
        assert_equal_idx(idx[b], patch_nn(q[b], k[b], 0.005))


def test_normalisation_changes_the_choice_like_the_reference():
    # queries crowd around a few keys: the normalised score moves some of them to other
    # keys; the op must move the same ones as the float64 reference
    k = torch.randn(60, 8)
    q = k[torch.randint(0, 5, (80,))] + 0.3 * torch.randn(80, 8)
    plain, spread = patch_nn(q, k, None), patch_nn(q, k, 0.005)
    ref_spread = reference.patch_nn_exact(q, k, 0.005)[0]
    assert (plain != ref_spread).any(), "test data too easy: normalisation changed nothing"
    check_scores(q, k, 0.005, spread)


# (the pruned search is torch.classes.fastgen.PatchIndex, a class whose methods opcheck
# cannot take; its argument checks and answers are tested in tests/test_patch_index.py)
@pytest.mark.parametrize("dtype,precision", [(torch.float32, "fp32"), (torch.bfloat16, "bf16")])
def test_opcheck(dtype, precision):
    q = torch.randn(2, 20, 6).to(dtype)
    k = torch.randn(2, 30, 6).to(dtype)
    torch.library.opcheck(torch.ops.fastgen.patch_nn.default, (q, k, 0.005, precision))
    torch.library.opcheck(torch.ops.fastgen.patch_nn.default, (q, k, 1.0, precision))
    torch.library.opcheck(torch.ops.fastgen.patch_nn.default, (q, k, None, precision))


@pytest.mark.parametrize("call,exc,msg", [
    (lambda: patch_nn(torch.randn(5, 3), torch.randn(4, 2)), ValueError, "D=3"),
    (lambda: patch_nn(torch.randn(5, 3), torch.randn(0, 3)), ValueError, "keys is empty"),
    (lambda: patch_nn(torch.randn(5, 3), torch.randn(4, 3), 0.0), ValueError, "alpha must be"),
    (lambda: patch_nn(torch.randn(5, 3), torch.randn(4, 3), float("nan")), ValueError, "alpha must be"),
    (lambda: patch_nn(torch.randn(5, 3), torch.randn(4, 3), 1e-50), ValueError, "alpha must be"),
    (lambda: patch_nn(torch.randn(5, 3), torch.randn(4, 3), 1e39), ValueError, "alpha must be"),
    (lambda: patch_nn(torch.tensor([[1.5e19], [1.4e19]]), torch.tensor([[-1.5e19], [1.4e19]])), ValueError, "too large"),
    (lambda: patch_nn(torch.randn(5, 3, device="meta"), torch.randn(4, 3, device="meta")), ValueError, "CPU or CUDA"),
    (lambda: patch_nn(torch.full((5, 3), float("nan")), torch.randn(4, 3)), ValueError, "queries contains NaN"),
    (lambda: patch_nn(torch.randn(5, 3), torch.randn(4, 3).double()), TypeError, "float32"),
    (lambda: patch_nn(torch.randn(5, 3), torch.randn(4, 3), precision="fp64"), ValueError, "precision"),
])
def test_bad_inputs(call, exc, msg):
    with pytest.raises(exc, match=msg):
        call()


def test_raw_op_with_a_meta_input_raises():
    # a meta input routes the call to the fake kernel, which must not hand back junk
    with pytest.raises(ValueError, match="one device"):
        torch.ops.fastgen.patch_nn(torch.randn(1, 5, 3), torch.randn(1, 4, 3, device="meta"), 0.005, "fp32")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b == "triton"])
def test_triton_ops_opcheck(backend):
    from fastgen.ops.triton.patch_nn import patch_nn_triton  # noqa: F401  (registers the op)
    q = torch.randn(2, 20, 6)
    k = torch.randn(2, 30, 6)
    torch.library.opcheck(torch.ops.fastgen.patch_nn_triton.default, (q, k, 0.005))
    torch.library.opcheck(torch.ops.fastgen.column_min_triton.default, (q, k))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b == "triton"])
def test_triton_ties_and_batches(backend):
    # small integers: distances are exact in fp32 (the kernel's centring shift is snapped
    # to a power-of-two grid) and both sides round d * w alike, so ties are real ties
    base = torch.randint(-2, 3, (40, 4)).float()
    keys = torch.cat([base, -base, base[:10]])            # the last 10 copy earlier keys
    q = torch.randint(-2, 3, (3, 50, 4)).float()
    idx = patch_nn(q, keys.expand(3, -1, -1), 0.5, backend=backend)
    d = ((q[:, :, None, :] - keys[None, None]) ** 2).sum(-1)
    w = (d.min(1).values + 0.5).reciprocal()
    assert_equal_idx(idx, (d * w[:, None, :]).argmin(-1))   # first index on ties


@pytest.mark.parametrize("backend,prune", [(b, True) for b in backends()] + [("cpp", False)])
@pytest.mark.parametrize("scale", [2.0 ** -40, 2.0 ** -30, 2.0 ** 40])
def test_alpha_scaled_with_the_data_gives_the_same_choice(backend, prune, scale):
    # d / (alpha + c) does not change when d, c and alpha scale alike: a power of two
    # (exact) must give the same keys at any scale alpha's range [1e-30, 1e30] allows
    torch.manual_seed(8)
    keys = torch.rand(300, 27)
    q = keys[torch.randint(300, (90,))] + 0.05 * torch.randn(90, 27)
    want = patch_nn(q, keys, 0.01, backend=backend, prune=prune)
    got = patch_nn(q * scale, keys * scale, 0.01 * scale ** 2, backend=backend, prune=prune)
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", backends())
def test_alpha_that_dominates_tiny_data_gives_the_plain_nearest(backend):
    # 1e-25 data with alpha = 0.005: alpha dwarfs every coverage term, the score is d / alpha
    torch.manual_seed(9)
    q, keys = torch.randn(80, 12) * 1e-25, torch.randn(200, 12) * 1e-25
    from fastgen.ops import knn
    assert torch.equal(patch_nn(q, keys, 0.005, backend=backend), knn(q, keys, 1).idx[:, 0])
