"""fastgen.ops.patch_nn against the float64 ground truth.

Natural patches are full of near-ties, so a choice is judged by the score it reaches
against the float64 optimum (within an fp32 error allowance), and by index equality
only where the best score beats the runner-up by more than that allowance.
"""
import pytest
import torch
import torch.nn.functional as F

from conftest import backends
from fastgen.ops import patch_nn, reference
from helpers import assert_equal_idx

BACKENDS = backends()  # triton where it runs (under TRITON_INTERPRET=1 on this machine)


def fp32_allowance(q, k, alpha):
    """Per query: how far an fp32 expansion-form score may sit from the float64 one."""
    mu = k.double().mean(0)
    qn = (q.double() - mu).norm(dim=1)
    kmax = (k.double() - mu).norm(dim=1).max()
    d_err = 64 * q.shape[1] * 2.0 ** -24 * (qn + kmax) ** 2  # generous fp32 bound on d
    if alpha is None:
        return d_err
    colmin = reference.sqdist_exact(q, k).min(0).values
    return d_err / (alpha + colmin.min())


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


def image_patches(size, patch=7):
    from sklearn.datasets import load_sample_image
    img = torch.from_numpy(load_sample_image("china.jpg").copy()).permute(2, 0, 1).float()[None] / 255
    img = F.interpolate(img, size=size, mode="area")
    return F.unfold(img, patch).transpose(1, 2)[0].contiguous()  # (L, 3*patch*patch)


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
    if alpha is None and backend == "cpp":  # plain NN is the certified exact path
        assert_equal_idx(idx, reference.patch_nn_exact(q, k, None)[0])


# precision is a CPU option: the Triton kernel always runs fp32 tiles
@pytest.mark.parametrize("backend,precision", [(b, p) for b in BACKENDS for p in ("fp32", "bf16")
                                               if b != "triton" or p == "fp32"])
def test_real_image_patches(backend, precision):
    keys = image_patches((28, 40))
    queries = keys + 0.05 * torch.randn_like(keys)  # a noisy copy, as in GPNN's coarsest level
    idx = patch_nn(queries, keys, 0.005, backend=backend, precision=precision)
    if precision == "fp32":
        check_scores(queries, keys, 0.005, idx)
    else:  # bf16 cross term: judged with bf16's allowance (2^-8 vs 2^-24 rounding)
        ref_idx, scores, best = reference.patch_nn_exact(queries, keys, 0.005)
        reached = scores.gather(1, idx[:, None])[:, 0]
        tol = fp32_allowance(queries, keys, 0.005) * 2.0 ** 16 / (64 * keys.shape[1])
        assert (reached <= best + tol).all()


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


def test_opcheck():
    q = torch.randn(1, 20, 6)
    k = torch.randn(1, 30, 6)
    torch.library.opcheck(torch.ops.fastgen.patch_nn.default, (q, k, 0.005, "fp32"))
    torch.library.opcheck(torch.ops.fastgen.patch_nn.default, (q, k, None, "fp32"))


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


# ---------------------------------------------------------------------------------------
# The pruned path (prune=True, KeyClusters, fastgen::patch_nn_clustered): (query, key)
# distances are skipped by triangle-inequality bounds, so the tests below also run on
# clustered data (image patches, blobs) where work really is skipped; a bound that is too
# high would skip the answer and show up as a worse score or a different index.

from fastgen.ops.patch_nn import KeyClusters, cluster_keys, prune_stats  # noqa: E402


def sqdist64(q, k):
    """(N, M) float64 squared distances without an (N, M, D) temporary (direct differences)."""
    return torch.cdist(q.double(), k.double(), compute_mode="donot_use_mm_for_euclid_dist").square()


def scores_and_errors(q, k, alpha, precision="fp32"):
    """float64 scores s = d / (alpha + colmin) (N, M) and, per entry, a first-order bound
    on how far the op's fp32 score may sit from it: d and colmin each off by at most
    e = f (||q - mu|| + max ||k - mu||)^2 (f = (3D + 8) 2^-24 for an fp32 cross term,
    + 2^-7 for bf16 inputs and output; csrc/engine/error_bound.h), plus the rounding of
    the weight and the product."""
    q, k = q.float(), k.float()
    d = sqdist64(q, k)
    colmin = d.min(0).values
    s = d / (alpha + colmin)
    mu = k.double().mean(0)
    qn = (q.double() - mu).norm(dim=1)
    kmax = (k.double() - mu).norm(dim=1).max()
    f = (3 * q.shape[1] + 8) * 2.0 ** -24 + (2.0 ** -7 if precision == "bf16" else 0.0)
    e_d = f * (qn + kmax) ** 2
    e_c = f * (qn.max() + kmax) ** 2
    sigma = (e_d[:, None] + s * e_c) / (alpha + colmin) + 4 * 2.0 ** -24 * s
    return s, sigma


def clear_of_runner_up(q, k, alpha, precision="fp32"):
    """(N,) bool: queries whose float64 best score beats the runner-up by more than twice
    the error bounds of both, so every exact method must pick the optimum there."""
    s, sigma = scores_and_errors(q, k, alpha, precision)
    if s.shape[1] == 1:
        return torch.ones(s.shape[0], dtype=torch.bool)
    top2, j = s.topk(2, dim=1, largest=False)
    return (top2[:, 1] - top2[:, 0]) > 2 * sigma.gather(1, j).sum(1)


def judge(q, k, alpha, idx, precision="fp32", min_clear=0.0):
    """check_scores with per-entry error bounds (scores_and_errors, twice over): the
    float64 score reached by every chosen key is the float64 optimum within the bounds
    of both, and where the optimum is clear of the runner-up the index is the optimum's.
    Returns the clear mask; at least `min_clear` of the queries must be clear."""
    s, sigma = scores_and_errors(q, k, alpha, precision)
    best, ref_idx = s.min(1)
    reached = s.gather(1, idx[:, None])[:, 0]
    slack = 2 * (sigma.gather(1, idx[:, None])[:, 0] + sigma.gather(1, ref_idx[:, None])[:, 0])
    bad = reached > best + slack
    if bad.any():
        i = int(bad.nonzero()[0])
        raise AssertionError(f"{int(bad.sum())} of {len(bad)} queries miss the optimum score by more than "
                             f"{precision} rounding allows; first: query {i} picks {int(idx[i])} "
                             f"(score {float(reached[i]):.9g}), optimum {int(ref_idx[i])} ({float(best[i]):.9g}), "
                             f"allowance {float(slack[i]):.3g}")
    clear = torch.ones_like(best, dtype=torch.bool)
    if s.shape[1] > 1:
        top2, j = s.topk(2, dim=1, largest=False)
        clear = (top2[:, 1] - top2[:, 0]) > 2 * sigma.gather(1, j).sum(1)
    assert_equal_idx(idx[clear], ref_idx[clear])
    assert clear.float().mean() >= min_clear, f"only {float(clear.float().mean()):.2f} of the queries are clear"
    return clear


def blobs(n, m, d, centres=12, sigma=0.5, scale=4.0, uncovered=0):
    """Queries and keys around a few far-apart centres: most distances can be skipped. With
    `uncovered`, that many key blobs get no queries: their keys' large column minima
    (small weights) draw queries from far away, as uncovered source regions do in GPNN."""
    c = scale * torch.randn(centres, d)
    return (c[torch.randint(0, centres - uncovered, (n,))] + sigma * torch.randn(n, d),
            c[torch.randint(0, centres, (m,))] + sigma * torch.randn(m, d))


# FASTGEN_PRUNE=QUERY_BLOCKxMAX_BALLxBATCH (csrc/cpu/patch_nn.cpp): small blocks and balls,
# one range per GEMM, so every skip is decided on its own bound; at the default shape
# most surviving ranges are gathered and computed anyway, which hides a loose bound.
FINE = "8x16x1"


def use_prune_shape(monkeypatch, shape):
    if shape is not None:
        monkeypatch.setenv("FASTGEN_PRUNE", shape)


def pruned_fraction(call):
    """Runs call() and returns (its result, the fraction of (query, key) distances its
    pruned passes computed), from prune_stats() before and after."""
    total0, computed0 = prune_stats()
    out = call()
    total1, computed1 = prune_stats()
    total, computed = total1 - total0, computed1 - computed0
    assert total > 0, "the call did not go through the pruned path"
    assert 0 < computed <= total
    return out, computed / total


PRUNE_SHAPES = [(1, 1, 1), (5, 1, 3), (7, 2, 5), (9, 3, 4), (40, 3, 2), (257, 129, 7),
                (100, 300, 33), (130, 700, 64)]


@pytest.mark.parametrize("shape", PRUNE_SHAPES)
@pytest.mark.parametrize("dtype,precision", [(torch.float32, "fp32"), (torch.float32, "bf16"),
                                             (torch.float16, "fp32"), (torch.bfloat16, "fp32"),
                                             (torch.bfloat16, "bf16")])
def test_pruned_random_data_reaches_optimum(shape, dtype, precision):
    n, m, d = shape
    q = torch.randn(n, d).to(dtype)
    k = torch.randn(m, d).to(dtype)
    idx = patch_nn(q, k, 0.005, precision=precision, prune=True)
    assert idx.shape == (n,) and idx.dtype == torch.long
    assert ((idx >= 0) & (idx < m)).all()
    judge(q, k, 0.005, idx, precision)


@pytest.mark.parametrize("prune_shape", [None, FINE])
@pytest.mark.parametrize("data", ["image", "image-offset", "blobs", "blobs-uncovered"])
@pytest.mark.parametrize("dtype,precision", [(torch.float32, "fp32"), (torch.float32, "bf16"),
                                             (torch.float16, "fp32"), (torch.bfloat16, "bf16")])
def test_pruned_clustered_data_reaches_optimum(data, dtype, precision, prune_shape, monkeypatch):
    use_prune_shape(monkeypatch, prune_shape)
    if data.startswith("image"):
        keys = image_patches((28, 40))  # 748 patches, D = 147
        queries = keys + 0.05 * torch.randn_like(keys)
        if data == "image-offset":  # far from the origin: the bounds must survive centring
            keys, queries = keys + 100, queries + 100
    else:
        queries, keys = blobs(700, 900, 9, uncovered=4 if data == "blobs-uncovered" else 0)
    q, k = queries.to(dtype), keys.to(dtype)
    idx, frac = pruned_fraction(lambda: patch_nn(q, k, 0.005, precision=precision))
    assert frac < 1.0, "test data too easy: nothing was skipped"
    judge(q, k, 0.005, idx, precision)


@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 2, 5), (40, 3, 2), (257, 129, 7), (100, 300, 33),
                                   (130, 700, 64), (301, 1000, 3)])
@pytest.mark.parametrize("alpha", [0.005, 1.0])
def test_pruned_equals_full_sweep_on_tie_free_data(shape, alpha):
    n, m, d = shape
    q, k = torch.randn(n, d), torch.randn(m, d)
    pruned, full = patch_nn(q, k, alpha, prune=True), patch_nn(q, k, alpha, prune=False)
    clear = judge(q, k, alpha, pruned, min_clear=0.2)
    assert_equal_idx(pruned[clear], full[clear])


@pytest.mark.parametrize("prune_shape", [None, FINE])
@pytest.mark.parametrize("uncovered", [0, 4])
@pytest.mark.parametrize("shape", [(700, 900, 9), (1000, 1500, 16), (600, 800, 24)])
def test_pruned_equals_full_sweep_on_blobs(shape, uncovered, prune_shape, monkeypatch):
    use_prune_shape(monkeypatch, prune_shape)
    q, k = blobs(*shape, uncovered=uncovered)
    pruned, frac = pruned_fraction(lambda: patch_nn(q, k, 0.005, prune=True))
    assert frac < 1.0, "test data too easy: nothing was skipped"
    full = patch_nn(q, k, 0.005, prune=False)
    clear = judge(q, k, 0.005, pruned, min_clear=0.2)
    assert_equal_idx(pruned[clear], full[clear])


def test_key_clusters_reused_across_query_sets():
    _, k = blobs(1, 800, 12)
    kc = cluster_keys(k)
    assert isinstance(kc, KeyClusters) and kc.keys is k
    for _ in range(3):
        q = k[torch.randint(0, 800, (300,))] + 0.5 * torch.randn(300, 12)
        reused = patch_nn(q, kc, 0.005)
        assert_equal_idx(reused, patch_nn(q, k, 0.005))            # clusters built inside
        assert_equal_idx(reused, patch_nn(q, cluster_keys(k), 0.005))
        clear = clear_of_runner_up(q, k, 0.005)
        assert_equal_idx(reused[clear], patch_nn(q, k, 0.005, prune=False)[clear])
        judge(q, k, 0.005, reused)


def check_clusters(kc, k):
    """KeyClusters invariants: offsets 0 .. M non-decreasing, order a permutation,
    sorted_keys the keys in that order."""
    m = k.shape[0]
    assert kc.offsets.dtype == torch.long and kc.order.dtype == torch.long
    assert kc.offsets[0] == 0 and kc.offsets[-1] == m
    assert (kc.offsets[1:] >= kc.offsets[:-1]).all()
    assert_equal_idx(kc.order.sort().values, torch.arange(m))
    assert torch.equal(kc.sorted_keys, k[kc.order]) and kc.sorted_keys.is_contiguous()


@pytest.mark.parametrize("cluster_size,iterations", [(1, 4), (1, 0), (7, 0), (128, 0), (300, 4),
                                                     (301, 2), (5000, 4)])
def test_cluster_keys_extremes(cluster_size, iterations):
    q, k = blobs(250, 301, 6, centres=5)
    kc = cluster_keys(k, cluster_size=cluster_size, iterations=iterations)
    check_clusters(kc, k)
    assert kc.offsets.numel() - 1 == -(-301 // cluster_size)  # ceil(M / cluster_size) clusters
    idx = patch_nn(q, kc, 0.005)
    judge(q, k, 0.005, idx)
    clear = clear_of_runner_up(q, k, 0.005)
    assert_equal_idx(idx[clear], patch_nn(q, k, 0.005, prune=False)[clear])


def test_cluster_keys_is_deterministic_and_keeps_dtype():
    k = torch.randn(500, 10).to(torch.bfloat16)
    a, b = cluster_keys(k, seed=3), cluster_keys(k, seed=3)
    check_clusters(a, k)
    assert a.sorted_keys.dtype == torch.bfloat16
    assert torch.equal(a.offsets, b.offsets) and torch.equal(a.order, b.order)


def test_any_valid_clustering_gives_the_same_answer():
    # the raw op trusts no clustering to be good: random groups, empty groups, one group
    q, k = blobs(300, 500, 8)
    m = k.shape[0]
    full = patch_nn(q, k, 0.005, prune=False)
    clear = clear_of_runner_up(q, k, 0.005)
    perm = torch.randperm(m)
    cuts = torch.randint(0, m + 1, (9,)).sort().values
    for order, offsets in [(perm, torch.cat([torch.tensor([0, 0]), cuts, torch.tensor([m, m])])),
                           (perm, torch.tensor([0, m])), (torch.arange(m), torch.arange(m + 1))]:
        idx = torch.ops.fastgen.patch_nn_clustered(q[None], k[order].contiguous(), offsets, order, 0.005, "fp32")
        assert idx.shape == (1, 300)
        assert_equal_idx(idx[0][clear], full[clear])


def symmetric_integer_keys(base):
    # keys and their negatives: the keys' mean is exactly 0, so with small integers every
    # distance, column minimum and score is exact in fp32 and equal scores really are equal
    return torch.cat([base, -base])


# blobs only in fp32: coordinates up to ~30 are not exact in a bf16 GEMM output
@pytest.mark.parametrize("prune_shape", [None, FINE])
@pytest.mark.parametrize("layout,precision", [("grid", "fp32"), ("grid", "bf16"), ("blobs", "fp32")])
@pytest.mark.parametrize("cluster_size", [1, 4, 128])
def test_duplicated_keys_tie_to_the_lowest_index(layout, cluster_size, precision, prune_shape, monkeypatch):
    use_prune_shape(monkeypatch, prune_shape)
    if layout == "grid":  # values in -2..2: many exact ties of distinct keys as well
        base = torch.randint(-2, 3, (60, 4)).float()
        q = torch.randint(-2, 3, (200, 4)).float()
    else:  # far-apart integer blobs: work is skipped while ties remain exact
        centres = 10.0 * torch.randint(-1, 2, (6, 4)).float()
        base = centres[torch.randint(0, 6, (100,))] + torch.randint(-1, 2, (100, 4)).float()
        q = symmetric_integer_keys(centres)[torch.randint(0, 12, (200,))] + torch.randint(-1, 2, (200, 4)).float()
    keys = symmetric_integer_keys(base)
    dup = torch.randint(0, keys.shape[0], (40,))
    keys = symmetric_integer_keys(torch.cat([base, base[dup % base.shape[0]]]))
    keys = keys[torch.randperm(keys.shape[0])]  # copies land before and after the originals
    kc = cluster_keys(keys, cluster_size=cluster_size)
    idx = patch_nn(q, kc, 0.5, precision=precision)
    assert_equal_idx(idx, patch_nn(q, keys, 0.5, precision=precision, prune=False))
    # the same fp32 arithmetic on the whole matrix (exact here), ties to the first index
    d = sqdist64(q, keys).float()
    w = (d.min(0).values + 0.5).reciprocal()
    assert_equal_idx(idx, (d * w).argmin(1))
    # and never a later copy of a key
    first_copy = (keys[idx][:, None, :] == keys[None]).all(-1).float().argmax(1)
    assert_equal_idx(idx, first_copy)


def test_pruning_skips_work_on_image_patches():
    keys = image_patches((64, 64))  # 3364 patches, D = 147
    queries = keys + 0.05 * torch.randn_like(keys)
    kc = cluster_keys(keys)
    idx, frac = pruned_fraction(lambda: patch_nn(queries, kc, 0.005))
    assert frac < 0.7, f"computed {frac:.2f} of the distances"
    assert idx.shape == (keys.shape[0],) and ((idx >= 0) & (idx < keys.shape[0])).all()


def test_pruning_skips_work_on_blobs():
    q, k = blobs(1000, 1500, 16)
    _, frac = pruned_fraction(lambda: patch_nn(q, k, 0.005))
    assert frac < 0.7, f"computed {frac:.2f} of the distances"


def _hints(kind, idx, m):
    if kind == "answer":
        return idx.clone()
    if kind == "random":
        return torch.randint(0, m, idx.shape)
    return torch.zeros_like(idx)  # "first": one key for every query


@pytest.mark.parametrize("prune_shape", [None, FINE])
@pytest.mark.parametrize("hint_kind", ["answer", "random", "first"])
@pytest.mark.parametrize("data,precision", [("image", "fp32"), ("image", "bf16"), ("blobs-uncovered", "fp32"),
                                            ("grid", "fp32")])
def test_hint_does_not_change_the_answer(data, precision, hint_kind, prune_shape, monkeypatch):
    use_prune_shape(monkeypatch, prune_shape)
    if data == "image":
        keys = image_patches((28, 40))
        q = keys + 0.05 * torch.randn_like(keys)
    elif data == "grid":  # exact arithmetic, many exact ties: the picks must match bit for bit
        keys = symmetric_integer_keys(torch.randint(-2, 3, (60, 4)).float())
        q = torch.randint(-2, 3, (200, 4)).float()
    else:
        q, keys = blobs(700, 900, 9, uncovered=4)
    kc = cluster_keys(keys)
    idx = patch_nn(q, kc, 0.005, precision=precision)
    hinted = patch_nn(q, kc, 0.005, precision=precision, hint=_hints(hint_kind, idx, keys.shape[0]))
    if data == "grid":
        assert_equal_idx(hinted, idx)
    else:
        judge(q, keys, 0.005, hinted, precision)
        clear = judge(q, keys, 0.005, idx, precision)
        assert_equal_idx(hinted[clear], idx[clear])


def test_hint_from_the_previous_iteration_skips_work():
    # GPNN's case: the next iteration's queries are close to this one's, so the last
    # answers are good thresholds from the start
    keys = image_patches((64, 64))
    q1 = keys + 0.05 * torch.randn_like(keys)
    q2 = q1 + 0.01 * torch.randn_like(q1)
    kc = cluster_keys(keys)
    prev = patch_nn(q1, kc, 0.005)
    plain, frac_plain = pruned_fraction(lambda: patch_nn(q2, kc, 0.005))
    hinted, frac_hinted = pruned_fraction(lambda: patch_nn(q2, kc, 0.005, hint=prev))
    assert frac_hinted < 0.95 * frac_plain, f"hinted {frac_hinted:.3f} vs {frac_plain:.3f} of the distances"
    clear = judge(q2, keys, 0.005, plain)
    assert_equal_idx(hinted[clear], plain[clear])


def test_hint_batched_and_ignored_by_unpruned_paths():
    q, k = torch.randn(3, 40, 5), torch.randn(60, 5)
    kc = cluster_keys(k, cluster_size=8)
    idx = patch_nn(q, kc, 0.005)
    assert_equal_idx(patch_nn(q, kc, 0.005, hint=torch.randint(0, 60, (3, 40))), idx)
    k3 = k.expand(3, -1, -1)
    full = patch_nn(q, k3, 0.005, prune=False)
    assert_equal_idx(patch_nn(q, k3, 0.005, prune=False, hint=idx), full)
    assert_equal_idx(patch_nn(q, k3, 0.005, backend="torch", hint=idx), patch_nn(q, k3, 0.005, backend="torch"))
    assert_equal_idx(patch_nn(q, k3, 0.005, hint=idx), idx)  # per-batch clustering of 3-D keys


@pytest.mark.parametrize("hint,exc,msg", [
    ([0, 1, 2], TypeError, "hint must be a torch.Tensor"),
    (torch.zeros(5, dtype=torch.int32), TypeError, "hint must be int64"),
    (torch.zeros(5), TypeError, "hint must be int64"),
    (torch.zeros(4, dtype=torch.long), ValueError, "hint must have shape"),
    (torch.zeros(1, 5, dtype=torch.long), ValueError, "hint must have shape"),
    (torch.tensor([0, 1, 2, 3, 10]), ValueError, r"hint values must be in \[0, 10\) \(key indices\)"),
    (torch.tensor([0, 1, -1, 3, 4]), ValueError, r"hint values must be in \[0, \d+\) \(key indices\)"),
])
def test_bad_hints(hint, exc, msg):
    q, k = torch.randn(5, 3), torch.randn(10, 3)
    with pytest.raises(exc, match=msg):
        patch_nn(q, k, 0.005, hint=hint)
    with pytest.raises(exc, match=msg):
        patch_nn(q, cluster_keys(k), 0.005, hint=hint)


@pytest.mark.parametrize("hint,exc,msg", [
    (torch.zeros(1, 4, dtype=torch.long), ValueError, "hint must be"),
    (torch.zeros(5, dtype=torch.long), ValueError, "hint must be"),
    (torch.zeros(1, 5, dtype=torch.int32), TypeError, "hint must be int64"),
    (torch.full((1, 5), 4), ValueError, r"hint values must be in \[0, \d+\) \(key indices\)"),
    (torch.full((1, 5), -1), ValueError, r"hint values must be in \[0, \d+\) \(key indices\)"),
])
def test_clustered_op_bad_hints(hint, exc, msg):
    with pytest.raises(exc, match=msg):
        torch.ops.fastgen.patch_nn_clustered(*_clustered_args(), hint)


def test_batched_pruned_with_key_clusters_and_3d_keys():
    q, k = blobs(3 * 120, 400, 10)
    q = q.view(3, 120, 10)
    kc = cluster_keys(k)
    idx = patch_nn(q, kc, 0.005)
    assert idx.shape == (3, 120) and idx.dtype == torch.long
    full = patch_nn(q, k.expand(3, -1, -1).contiguous(), 0.005, prune=False)
    for b in range(3):
        assert_equal_idx(idx[b], patch_nn(q[b], kc, 0.005))
        clear = clear_of_runner_up(q[b], k, 0.005)
        assert_equal_idx(idx[b][clear], full[b][clear])
    # a key set per batch element (clusters built per element)
    k3 = torch.stack([k, k.flip(0) + 0.1, torch.randn(400, 10)])
    idx3 = patch_nn(q, k3, 0.005)
    full3 = patch_nn(q, k3, 0.005, prune=False)
    assert idx3.shape == (3, 120)
    for b in range(3):
        assert_equal_idx(idx3[b], patch_nn(q[b], k3[b], 0.005))
        clear = clear_of_runner_up(q[b], k3[b], 0.005)
        assert_equal_idx(idx3[b][clear], full3[b][clear])
        judge(q[b], k3[b], 0.005, idx3[b])


def test_key_clusters_with_the_torch_backend_and_no_alpha():
    # paths that do not prune still accept a KeyClusters and answer for the original keys
    q, k = torch.randn(50, 6), torch.randn(70, 6)
    kc = cluster_keys(k, cluster_size=16)
    assert_equal_idx(patch_nn(q, kc, None), patch_nn(q, k, None))
    assert_equal_idx(patch_nn(q, kc, 0.005, backend="torch"), patch_nn(q, k, 0.005, backend="torch"))
    assert_equal_idx(patch_nn(q, kc, 0.005, prune=False), patch_nn(q, k, 0.005, prune=False))


def _clustered_args(**change):
    """Valid arguments of the raw op (4 keys in 2 clusters), with some replaced."""
    args = dict(queries=torch.randn(1, 5, 3), keys=torch.randn(4, 3), key_offsets=torch.tensor([0, 2, 4]),
                key_order=torch.tensor([1, 0, 3, 2]), alpha=0.005, precision="fp32")
    args.update(change)
    return tuple(args.values())


def _nan_at(shape, where):
    t = torch.randn(*shape)
    t.view(-1)[where] = float("nan")
    return t


@pytest.mark.parametrize("change,exc,msg", [
    (dict(key_offsets=torch.tensor([1, 2, 4])), ValueError, "key_offsets must start at 0"),
    (dict(key_offsets=torch.tensor([0, 2, 3])), ValueError, "key_offsets must start at 0 and end"),
    (dict(key_offsets=torch.tensor([0, 2, 5])), ValueError, "key_offsets must start at 0 and end"),
    (dict(key_offsets=torch.tensor([0, 3, 1, 4])), ValueError, "key_offsets must be non-decreasing"),
    (dict(key_offsets=torch.tensor([0, -1, 4])), ValueError, "key_offsets must be non-decreasing"),
    (dict(key_offsets=torch.tensor([0, 2, 4], dtype=torch.int32)), TypeError, "key_offsets must be int64"),
    (dict(key_offsets=torch.tensor([0.0, 2.0, 4.0])), TypeError, "key_offsets must be int64"),
    (dict(key_offsets=torch.tensor([[0, 2, 4]])), ValueError, "key_offsets must be a 1-D"),
    (dict(key_offsets=torch.tensor([0])), ValueError, "key_offsets must be a 1-D"),
    (dict(key_order=torch.tensor([1, 1, 3, 2])), ValueError, "key_order must be a permutation"),
    (dict(key_order=torch.tensor([1, 0, 3, 4])), ValueError, "key_order must be a permutation"),
    (dict(key_order=torch.tensor([1, 0, 3, -1])), ValueError, "key_order must be a permutation"),
    (dict(key_order=torch.tensor([1, 0, 3])), ValueError, "key_order must be a 1-D tensor of 4"),
    (dict(key_order=torch.tensor([1, 0, 3, 2, 4])), ValueError, "key_order must be a 1-D tensor of 4"),
    (dict(key_order=torch.tensor([[1, 0, 3, 2]])), ValueError, "key_order must be a 1-D"),
    (dict(key_order=torch.tensor([1, 0, 3, 2], dtype=torch.int32)), TypeError, "key_order must be int64"),
    (dict(queries=_nan_at((1, 5, 3), 7)), ValueError, "queries contains NaN"),
    (dict(queries=torch.full((1, 5, 3), float("inf"))), ValueError, "queries contains NaN or infinite"),
    (dict(keys=_nan_at((4, 3), 5)), ValueError, "keys contains NaN"),
    (dict(alpha=0.0), ValueError, "alpha must be"),
    (dict(alpha=-1.0), ValueError, "alpha must be"),
    (dict(alpha=float("nan")), ValueError, "alpha must be"),
    (dict(alpha=float("inf")), ValueError, "alpha must be"),
    (dict(alpha=1e-31), ValueError, "alpha must be"),
    (dict(alpha=1e31), ValueError, "alpha must be"),
    (dict(keys=torch.randn(0, 3), key_offsets=torch.tensor([0, 0]), key_order=torch.zeros(0, dtype=torch.long)),
     ValueError, "keys is empty"),
    (dict(keys=torch.randn(4, 2)), ValueError, "D=3"),
    (dict(keys=torch.randn(4, 3).half()), TypeError, "same dtype"),
    (dict(queries=torch.randn(1, 5, 3).double(), keys=torch.randn(4, 3).double()), TypeError, "queries must be float32"),
    (dict(queries=torch.randn(5, 3)), ValueError, "queries must be a 3-D"),
    (dict(keys=torch.randn(1, 4, 3)), ValueError, "keys must be a 2-D"),
    (dict(precision="fp64"), ValueError, "precision"),
])
def test_clustered_op_bad_inputs(change, exc, msg):
    with pytest.raises(exc, match=msg):
        torch.ops.fastgen.patch_nn_clustered(*_clustered_args(**change))


def test_clustered_op_valid_base_args():
    # the base of the bad-input cases is itself valid, so each case fails for its own reason
    idx = torch.ops.fastgen.patch_nn_clustered(*_clustered_args())
    assert idx.shape == (1, 5) and ((idx >= 0) & (idx < 4)).all()
    empty = torch.ops.fastgen.patch_nn_clustered(*_clustered_args(queries=torch.randn(2, 0, 3)))
    assert empty.shape == (2, 0)


@pytest.mark.parametrize("call,exc,msg", [
    (lambda: cluster_keys(torch.randn(10, 3), cluster_size=0), ValueError, "cluster_size"),
    (lambda: cluster_keys(torch.randn(10, 3), cluster_size=-4), ValueError, "cluster_size"),
    (lambda: cluster_keys(torch.randn(10, 3), cluster_size=2.5), ValueError, "cluster_size"),
    (lambda: cluster_keys(torch.randn(10, 3), cluster_size=True), ValueError, "cluster_size"),
    (lambda: cluster_keys(torch.randn(10, 3), iterations=-1), ValueError, "iterations"),
    (lambda: cluster_keys(torch.randn(10, 3), iterations=1.0), ValueError, "iterations"),
    (lambda: cluster_keys(torch.randn(0, 3)), ValueError, "keys is empty"),
    (lambda: cluster_keys(_nan_at((10, 3), 4)), ValueError, "keys contains NaN"),
    (lambda: cluster_keys(torch.randn(2, 10, 3)), ValueError, "keys must be 2-D"),
    (lambda: cluster_keys(torch.randn(10, 3).double()), TypeError, "keys must be float32"),
    (lambda: patch_nn(torch.randn(5, 2), cluster_keys(torch.randn(10, 3))), ValueError, "D=2"),
    (lambda: patch_nn(torch.randn(5, 3).half(), cluster_keys(torch.randn(10, 3))), TypeError, "queries is torch.float16"),
])
def test_cluster_keys_bad_inputs(call, exc, msg):
    with pytest.raises(exc, match=msg):
        call()


@pytest.mark.parametrize("dtype,alpha,precision", [(torch.float32, 0.005, "fp32"), (torch.bfloat16, 1.0, "bf16")])
def test_clustered_opcheck(dtype, alpha, precision):
    q = torch.randn(2, 20, 6).to(dtype)
    k = torch.randn(30, 6).to(dtype)
    kc = cluster_keys(k, cluster_size=8)
    torch.library.opcheck(torch.ops.fastgen.patch_nn_clustered.default,
                          (q, kc.sorted_keys, kc.offsets, kc.order, alpha, precision))
    torch.library.opcheck(torch.ops.fastgen.patch_nn_clustered.default,
                          (q, kc.sorted_keys, kc.offsets, kc.order, alpha, precision, torch.randint(0, 30, (2, 20))))


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


def test_clustered_op_rejects_a_bound_table_near_n_by_m():
    # one key per cluster and half a million queries: the (query block x cluster) bound
    # table would pass 1 GB, so the op refuses before allocating anything
    q = torch.zeros(1, 32 * 2 ** 14, 1)
    k = torch.arange(2 ** 13 + 1, dtype=torch.float32)[:, None]
    offsets = torch.arange(k.shape[0] + 1)
    with pytest.raises(ValueError, match="too many key clusters"):
        torch.ops.fastgen.patch_nn_clustered(q, k, offsets, torch.arange(k.shape[0]), 0.005, "fp32")
    # fewer queries with the same clusters pass: every query sits at 0, key 0 is at 0,
    # so key 0's score 0 beats every other key's j^2 / (alpha + j^2)
    idx = torch.ops.fastgen.patch_nn_clustered(q[:, :4096], k, offsets, torch.arange(k.shape[0]), 0.005, "fp32")
    assert idx.shape == (1, 4096) and bool((idx == 0).all())
