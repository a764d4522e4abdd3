"""fastgen.ops.PatchIndex (the pruned and incremental patch_nn search) and the C++ class
under it (torch.classes.fastgen.PatchIndex), against the float64 ground truth.

Pruned searches skip (query, key) distances by triangle-inequality bounds, so most tests
below run on clustered data (image patches, blobs) where work really is skipped; a bound
that is too high would skip the answer and show up as a worse score or a different
index. Answers are judged like patch_nn's own (helpers.judge: the float64 score each
chosen key reaches is the optimum within fp32/bf16 rounding, and the index is the
optimum's wherever the optimum is clear of the runner-up).

Incremental searches (the default of PatchIndex on the CPU) must return what a search
from scratch returns, on sequences of query sets where some queries change per step as
in GPNN: none, a few, a region, most, all.
"""
import pytest
import torch

import fastgen.ops
from fastgen.ops import PatchIndex, PatchIndexStats, patch_nn, prune_stats
from fastgen.ops.patch_index import cluster_keys
from helpers import (FINE, assert_equal_idx, blobs, clear_of_runner_up, fp32_allowance, image_patches, judge,
                     sqdist64, symmetric_integer_keys, use_prune_shape)

ALPHA = 0.005


def cpp_index(keys, cluster_size=64, iterations=4, precision="fp32", seed=0):
    """The C++ class on keys clustered by cluster_keys, with that clustering."""
    sorted_keys, offsets, order = cluster_keys(keys, cluster_size=cluster_size, iterations=iterations, seed=seed)
    return torch.classes.fastgen.PatchIndex(sorted_keys, offsets, order, precision), (sorted_keys, offsets, order)


def pruned(keys, alpha=ALPHA, **kw):
    """An index whose every search is a pruned search from scratch (what patch_nn runs)."""
    return PatchIndex(keys, alpha, incremental=False, **kw)


def fraction_after(index, call):
    """Runs call() on a reset index: (its result, the fraction of the (query, key)
    distances its pruned passes computed)."""
    index.reset()
    out = call()
    s = index.stats
    assert s.pairs_total > 0, "the call did not go through the pruned path"
    assert 0 < s.pairs_computed <= s.pairs_total
    return out, s.fraction_computed


# ---------------------------------------------------------------------------------------
# Pruned searches from scratch: PatchIndex(..., incremental=False).search, patch_nn(prune=True)

PRUNE_SHAPES = [(1, 1, 1), (5, 1, 3), (7, 2, 5), (9, 3, 4), (40, 3, 2), (257, 129, 7),
                (100, 300, 33), (130, 700, 64)]
DTYPE_PRECISIONS = [(torch.float32, "fp32"), (torch.float32, "bf16"), (torch.float16, "fp32"),
                    (torch.bfloat16, "fp32"), (torch.bfloat16, "bf16")]


@pytest.mark.parametrize("incremental", [False, True])
@pytest.mark.parametrize("shape", PRUNE_SHAPES)
@pytest.mark.parametrize("dtype,precision", DTYPE_PRECISIONS)
def test_random_data_reaches_optimum(shape, dtype, precision, incremental):
    # incremental=True: a first search runs the class's column_min and weighted_argmin
    # over all keys instead of its search method
    n, m, d = shape
    q = torch.randn(n, d).to(dtype)
    k = torch.randn(m, d).to(dtype)
    index = PatchIndex(k, ALPHA, precision=precision, incremental=incremental)
    idx = index.search(q)
    assert idx.shape == (n,) and idx.dtype == torch.long
    assert ((idx >= 0) & (idx < m)).all()
    judge(q, k, ALPHA, idx, precision)
    s = index.stats
    assert (s.searches, s.from_scratch, s.incremental, s.last_changed) == (1, 1, 0, [None])
    assert s.pairs_total == 2 * n * m  # both pruned passes, over every (query, key) pair
    assert 0 < s.pairs_computed <= s.pairs_total


def clustered_data(data):
    if data.startswith("image"):
        keys = image_patches((28, 40))  # 748 patches, D = 147
        queries = keys + 0.05 * torch.randn_like(keys)
        if data == "image-offset":  # far from the origin: the bounds must survive centring
            keys, queries = keys + 100, queries + 100
        return queries, keys
    return blobs(700, 900, 9, uncovered=4 if data == "blobs-uncovered" else 0)


@pytest.mark.parametrize("prune_shape", [None, FINE])
@pytest.mark.parametrize("data", ["image", "image-offset", "blobs", "blobs-uncovered"])
@pytest.mark.parametrize("dtype,precision", [(torch.float32, "fp32"), (torch.float32, "bf16"),
                                             (torch.float16, "fp32"), (torch.bfloat16, "bf16")])
def test_clustered_data_reaches_optimum(data, dtype, precision, prune_shape, monkeypatch):
    use_prune_shape(monkeypatch, prune_shape)
    queries, keys = clustered_data(data)
    q, k = queries.to(dtype), keys.to(dtype)
    index = pruned(k, precision=precision)
    idx, frac = fraction_after(index, lambda: index.search(q))
    assert frac < 1.0, "test data too easy: nothing was skipped"
    judge(q, k, ALPHA, idx, precision)


@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 2, 5), (40, 3, 2), (257, 129, 7), (100, 300, 33),
                                   (130, 700, 64), (301, 1000, 3)])
@pytest.mark.parametrize("alpha", [0.005, 1.0])
def test_pruned_equals_full_sweep_on_tie_free_data(shape, alpha):
    n, m, d = shape
    q, k = torch.randn(n, d), torch.randn(m, d)
    got = pruned(k, alpha).search(q)
    full = PatchIndex(k, alpha, prune=False).search(q)
    clear = judge(q, k, alpha, got, min_clear=0.2)
    assert_equal_idx(got[clear], full[clear])


@pytest.mark.parametrize("prune_shape", [None, FINE])
@pytest.mark.parametrize("uncovered", [0, 4])
@pytest.mark.parametrize("shape", [(700, 900, 9), (1000, 1500, 16), (600, 800, 24)])
def test_pruned_equals_full_sweep_on_blobs(shape, uncovered, prune_shape, monkeypatch):
    use_prune_shape(monkeypatch, prune_shape)
    q, k = blobs(*shape, uncovered=uncovered)
    index = pruned(k)
    got, frac = fraction_after(index, lambda: index.search(q))
    assert frac < 1.0, "test data too easy: nothing was skipped"
    full = patch_nn(q, k, ALPHA, prune=False)
    clear = judge(q, k, ALPHA, got, min_clear=0.2)
    assert_equal_idx(got[clear], full[clear])


def test_index_reused_across_query_sets():
    _, k = blobs(1, 800, 12)
    index = pruned(k)
    for _ in range(3):
        q = k[torch.randint(0, 800, (300,))] + 0.5 * torch.randn(300, 12)
        reused = index.search(q)
        assert_equal_idx(reused, patch_nn(q, k, ALPHA))      # a one-shot index built inside
        assert_equal_idx(reused, pruned(k).search(q))         # a fresh index: the same clustering
        clear = clear_of_runner_up(q, k, ALPHA)
        assert_equal_idx(reused[clear], patch_nn(q, k, ALPHA, prune=False)[clear])
        judge(q, k, ALPHA, reused)
    s = index.stats
    assert (s.searches, s.from_scratch, s.incremental) == (3, 3, 0)
    assert s.pairs_total == 3 * 2 * 300 * 800


def test_patch_nn_prune_goes_through_a_one_shot_index():
    q, k = blobs(400, 600, 8)
    t0, c0 = prune_stats()
    idx = patch_nn(q, k, ALPHA, prune=True)
    t1, c1 = prune_stats()
    assert t1 - t0 == 2 * 400 * 600 and 0 < c1 - c0 < t1 - t0  # pruned, and work was skipped
    assert_equal_idx(idx, pruned(k).search(q))
    judge(q, k, ALPHA, idx)
    # 3-D keys: an index per batch element
    q3, k3 = torch.stack([q[:200], q[200:]]), torch.stack([k, k.flip(0)])
    t0, _ = prune_stats()
    idx3 = patch_nn(q3, k3, ALPHA, prune=True)
    assert prune_stats()[0] - t0 == 2 * 2 * 200 * 600
    for b in range(2):
        assert_equal_idx(idx3[b], pruned(k3[b]).search(q3[b]))
    # paths that do not prune leave the counters alone
    t0, c0 = prune_stats()
    patch_nn(q, k, ALPHA, prune=False)
    patch_nn(q, k, None)
    patch_nn(q, k, ALPHA, backend="torch")
    assert prune_stats() == (t0, c0)


def test_prune_stats_grows_with_every_pruned_search():
    assert fastgen.ops.patch_index.prune_stats is prune_stats
    q, k = blobs(300, 500, 6)
    index = PatchIndex(k, ALPHA)
    before = prune_stats()
    index.search(q)
    q2 = q.clone()
    q2[:30] += 0.01 * torch.randn(30, 6)
    index.search(q2)                              # an incremental search counts too
    after = prune_stats()
    s = index.stats
    assert s.searches == 2 and s.incremental == 1
    assert after[0] - before[0] == s.pairs_total > 2 * 300 * 500
    assert after[1] - before[1] == s.pairs_computed > 0


def check_clusters(clusters, k):
    """cluster_keys' invariants: offsets 0 .. M non-decreasing, order a permutation,
    sorted_keys the keys in that order."""
    assert isinstance(clusters, tuple) and len(clusters) == 3
    sorted_keys, offsets, order = clusters
    m = k.shape[0]
    assert offsets.dtype == torch.long and order.dtype == torch.long
    assert offsets[0] == 0 and offsets[-1] == m
    assert (offsets[1:] >= offsets[:-1]).all()
    assert_equal_idx(order.sort().values, torch.arange(m))
    assert torch.equal(sorted_keys, k[order]) and sorted_keys.is_contiguous()


@pytest.mark.parametrize("cluster_size,iterations", [(1, 4), (1, 0), (7, 0), (128, 0), (300, 4),
                                                     (301, 2), (5000, 4)])
def test_cluster_keys_extremes(cluster_size, iterations):
    q, k = blobs(250, 301, 6, centres=5)
    index, clusters = cpp_index(k, cluster_size=cluster_size, iterations=iterations)
    check_clusters(clusters, k)
    _, offsets, order = clusters
    assert offsets.numel() - 1 == -(-301 // cluster_size)  # ceil(M / cluster_size) clusters
    assert (index.size(), index.dim(), index.clusters()) == (301, 6, offsets.numel() - 1)
    assert_equal_idx(index.positions()[order], torch.arange(301))  # id -> sorted position
    idx = index.search(q[None], ALPHA, None)[0]
    judge(q, k, ALPHA, idx)
    clear = clear_of_runner_up(q, k, ALPHA)
    assert_equal_idx(idx[clear], patch_nn(q, k, ALPHA, prune=False)[clear])
    if iterations == 4:  # PatchIndex's own clustering (4 iterations, seed 0)
        assert_equal_idx(pruned(k, cluster_size=cluster_size).search(q), idx)


def test_cluster_keys_is_deterministic_and_keeps_dtype():
    k = torch.randn(500, 10).to(torch.bfloat16)
    a, b = cluster_keys(k, seed=3), cluster_keys(k, seed=3)
    check_clusters(a, k)
    assert a[0].dtype == torch.bfloat16
    assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])


def test_any_valid_clustering_gives_the_same_answer():
    # the class trusts no clustering to be good: random groups, empty groups, one group
    q, k = blobs(300, 500, 8)
    m = k.shape[0]
    full = patch_nn(q, k, ALPHA, prune=False)
    clear = clear_of_runner_up(q, k, ALPHA)
    perm = torch.randperm(m)
    cuts = torch.randint(0, m + 1, (9,)).sort().values
    for order, offsets in [(perm, torch.cat([torch.tensor([0, 0]), cuts, torch.tensor([m, m])])),
                           (perm, torch.tensor([0, m])), (torch.arange(m), torch.arange(m + 1))]:
        index = torch.classes.fastgen.PatchIndex(k[order].contiguous(), offsets, order, "fp32")
        assert index.clusters() == offsets.numel() - 1
        idx = index.search(q[None], ALPHA, None)
        assert idx.shape == (1, 300)
        assert_equal_idx(idx[0][clear], full[clear])
        colmin, _ = index.column_min(q, None, None)  # over sorted positions
        best = sqdist64(q, k[order]).min(0).values
        assert ((colmin.double() - best).abs() <= 1e-4 * (1 + best)).all()


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
    dup = torch.randint(0, base.shape[0], (40,))
    keys = symmetric_integer_keys(torch.cat([base, base[dup]]))
    keys = keys[torch.randperm(keys.shape[0])]  # copies land before and after the originals
    idx = pruned(keys, 0.5, precision=precision, cluster_size=cluster_size).search(q)
    assert_equal_idx(idx, PatchIndex(keys, 0.5, precision=precision, prune=False).search(q))
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
    index = pruned(keys)
    idx, frac = fraction_after(index, lambda: index.search(queries))
    assert frac < 0.7, f"computed {frac:.2f} of the distances"
    assert idx.shape == (keys.shape[0],) and ((idx >= 0) & (idx < keys.shape[0])).all()


def test_pruning_skips_work_on_blobs():
    q, k = blobs(1000, 1500, 16)
    index = pruned(k)
    _, frac = fraction_after(index, lambda: index.search(q))
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
    index = pruned(keys, precision=precision)
    idx = index.search(q)
    hinted = index.search(q, hint=_hints(hint_kind, idx, keys.shape[0]))
    assert index.stats.from_scratch == 2
    if data == "grid":
        assert_equal_idx(hinted, idx)
    else:
        judge(q, keys, ALPHA, hinted, precision)
        clear = judge(q, keys, ALPHA, idx, precision)
        assert_equal_idx(hinted[clear], idx[clear])


def test_hint_from_the_previous_iteration_skips_work():
    # GPNN's case: the next iteration's queries are close to this one's, so the last
    # answers are good thresholds from the start
    keys = image_patches((64, 64))
    q1 = keys + 0.05 * torch.randn_like(keys)
    q2 = q1 + 0.01 * torch.randn_like(q1)
    index = pruned(keys)
    prev = index.search(q1)
    plain, frac_plain = fraction_after(index, lambda: index.search(q2))
    hinted, frac_hinted = fraction_after(index, lambda: index.search(q2, hint=prev))
    assert frac_hinted < 0.95 * frac_plain, f"hinted {frac_hinted:.3f} vs {frac_plain:.3f} of the distances"
    clear = judge(q2, keys, ALPHA, plain)
    assert_equal_idx(hinted[clear], plain[clear])


def test_hint_batched_and_ignored_by_unpruned_paths():
    q, k = torch.randn(3, 40, 5), torch.randn(60, 5)
    index = pruned(k, cluster_size=8)
    idx = index.search(q)
    assert idx.shape == (3, 40)
    assert_equal_idx(index.search(q, hint=torch.randint(0, 60, (3, 40))), idx)
    assert_equal_idx(PatchIndex(k, ALPHA, cluster_size=8).search(q, hint=torch.randint(0, 60, (3, 40))), idx)
    k3 = k.expand(3, -1, -1)
    full = patch_nn(q, k3, ALPHA, prune=False)
    assert_equal_idx(patch_nn(q, k3, ALPHA, prune=False, hint=idx), full)
    assert_equal_idx(PatchIndex(k, ALPHA, prune=False).search(q, hint=idx), full)
    assert_equal_idx(patch_nn(q, k3, ALPHA, backend="torch", hint=idx), patch_nn(q, k3, ALPHA, backend="torch"))
    assert_equal_idx(PatchIndex(k, ALPHA, backend="torch").search(q, hint=idx),
                     patch_nn(q, k3, ALPHA, backend="torch"))
    assert_equal_idx(patch_nn(q, k3, ALPHA, hint=idx), idx)  # an index per batch element of 3-D keys


@pytest.mark.parametrize("how", ["patch_nn", "pruned", "incremental", "sweep"])
@pytest.mark.parametrize("hint,exc,msg", [
    ([0, 1, 2], TypeError, "hint must be a torch.Tensor"),
    (torch.zeros(5, dtype=torch.int32), TypeError, "hint must be int64"),
    (torch.zeros(5), TypeError, "hint must be int64"),
    (torch.zeros(4, dtype=torch.long), ValueError, "hint must have shape"),
    (torch.zeros(1, 5, dtype=torch.long), ValueError, "hint must have shape"),
    (torch.tensor([0, 1, 2, 3, 10]), ValueError, r"hint values must be in \[0, 10\) \(key indices\)"),
    (torch.tensor([0, 1, -1, 3, 4]), ValueError, r"hint values must be in \[0, \d+\) \(key indices\)"),
])
def test_bad_hints(hint, exc, msg, how):
    q, k = torch.randn(5, 3), torch.randn(10, 3)
    search = {"patch_nn": lambda h: patch_nn(q, k, ALPHA, hint=h),
              "pruned": lambda h: pruned(k).search(q, hint=h),
              "incremental": lambda h: PatchIndex(k, ALPHA).search(q, hint=h),
              "sweep": lambda h: PatchIndex(k, ALPHA, prune=False).search(q, hint=h)}[how]
    with pytest.raises(exc, match=msg):
        search(hint)


def test_batched_pruned_and_3d_keys():
    q, k = blobs(3 * 120, 400, 10)
    q = q.view(3, 120, 10)
    index = pruned(k)
    idx = index.search(q)
    assert idx.shape == (3, 120) and idx.dtype == torch.long
    assert index.stats.from_scratch == 3 and index.stats.last_changed == [None] * 3
    full = patch_nn(q, k.expand(3, -1, -1).contiguous(), ALPHA, prune=False)
    for b in range(3):
        assert_equal_idx(idx[b], index.search(q[b]))
        clear = clear_of_runner_up(q[b], k, ALPHA)
        assert_equal_idx(idx[b][clear], full[b][clear])
    # a key set per batch element (an index per element inside patch_nn)
    k3 = torch.stack([k, k.flip(0) + 0.1, torch.randn(400, 10)])
    idx3 = patch_nn(q, k3, ALPHA)
    full3 = patch_nn(q, k3, ALPHA, prune=False)
    assert idx3.shape == (3, 120)
    for b in range(3):
        assert_equal_idx(idx3[b], patch_nn(q[b], k3[b], ALPHA))
        clear = clear_of_runner_up(q[b], k3[b], ALPHA)
        assert_equal_idx(idx3[b][clear], full3[b][clear])
        judge(q[b], k3[b], ALPHA, idx3[b])


@pytest.mark.parametrize("max_key_bytes", [256 << 20, 1])
def test_unpruned_indexes_sweep_like_patch_nn(max_key_bytes):
    # alpha=None, backend="torch" and prune=False run patch_nn's full sweep; max_key_bytes
    # only cuts the batch into chunks (1 byte: one element per chunk)
    q, k = torch.randn(3, 50, 6), torch.randn(70, 6)
    k3 = k.expand(3, -1, -1)
    for alpha, kw in [(None, {}), (ALPHA, dict(backend="torch")), (ALPHA, dict(prune=False)),
                      (1.0, dict(prune=False, precision="bf16"))]:
        index = PatchIndex(k, alpha, max_key_bytes=max_key_bytes, **kw)
        assert not index.pruned and not index.incremental
        want = patch_nn(q, k3, alpha, **{"prune": False, **kw})
        assert_equal_idx(index.search(q), want)
        assert_equal_idx(index.search(q[1]), want[1])
        s = index.stats
        assert (s.searches, s.from_scratch, s.incremental, s.last_changed) == (2, 4, 0, [None])
        assert (s.pairs_total, s.pairs_computed, s.fraction_computed) == (0, 0, None)
        assert index.search(q[:, :0]).shape == (3, 0) and index.search(q[:0]).shape == (0, 50)


def test_plain_nearest_neighbour_index_is_exact():
    q, k = torch.randn(200, 9), torch.randn(300, 9)
    ref = sqdist64(q, k).argmin(1)
    assert_equal_idx(PatchIndex(k, None).search(q), ref)


# ---------------------------------------------------------------------------------------
# The C++ class: constructor, search, and argument checks (csrc/cpu/patch_index.cpp,
# csrc/cpu/checks.h). The clustered op's opcheck test is gone with the op: opcheck cannot
# take a class method (tests/test_patch_nn.py::test_opcheck keeps fastgen::patch_nn's).

def _class_args(**change):
    """Valid constructor arguments (4 keys in 2 clusters), with some replaced."""
    args = dict(sorted_keys=torch.randn(4, 3), key_offsets=torch.tensor([0, 2, 4]),
                key_order=torch.tensor([1, 0, 3, 2]), precision="fp32")
    args.update(change)
    return tuple(args.values())


def _class(**change):
    return torch.classes.fastgen.PatchIndex(*_class_args(**change))


def _nan_at(shape, where):
    t = torch.randn(*shape)
    t.view(-1)[where] = float("nan")
    return t


@pytest.mark.parametrize("change,exc,msg", [
    (dict(key_offsets=torch.tensor([1, 2, 4])), ValueError, "key_offsets must start at 0"),
    (dict(key_offsets=torch.tensor([0, 2, 3])), ValueError,
     "key_offsets must start at 0 and end at the number of items"),
    (dict(key_offsets=torch.tensor([0, 2, 5])), ValueError,
     "key_offsets must start at 0 and end at the number of items"),
    (dict(key_offsets=torch.tensor([0, 3, 1, 4])), ValueError, "key_offsets must be non-decreasing"),
    (dict(key_offsets=torch.tensor([0, -1, 4])), ValueError, "key_offsets must be non-decreasing"),
    (dict(key_offsets=torch.tensor([0, 2, 4], dtype=torch.int32)), TypeError, "key_offsets must be int64"),
    (dict(key_offsets=torch.tensor([0.0, 2.0, 4.0])), TypeError, "key_offsets must be int64"),
    (dict(key_offsets=torch.tensor([[0, 2, 4]])), ValueError, "key_offsets must be a 1-D"),
    (dict(key_offsets=torch.tensor([0])), ValueError, "key_offsets must be a 1-D"),
    (dict(key_offsets=torch.tensor([0, 2, 4], device="meta")), RuntimeError, "key_offsets must be on the CPU"),
    (dict(key_order=torch.tensor([1, 1, 3, 2])), ValueError, "key_order must be a permutation"),
    (dict(key_order=torch.tensor([1, 0, 3, 4])), ValueError, "key_order must be a permutation"),
    (dict(key_order=torch.tensor([1, 0, 3, -1])), ValueError, "key_order must be a permutation"),
    (dict(key_order=torch.tensor([1, 0, 3])), ValueError, "key_order must be a 1-D tensor of 4"),
    (dict(key_order=torch.tensor([1, 0, 3, 2, 4])), ValueError, "key_order must be a 1-D tensor of 4"),
    (dict(key_order=torch.tensor([[1, 0, 3, 2]])), ValueError, "key_order must be a 1-D"),
    (dict(key_order=torch.tensor([1, 0, 3, 2], dtype=torch.int32)), TypeError, "key_order must be Long"),
    (dict(sorted_keys=_nan_at((4, 3), 5)), ValueError, "keys contains NaN"),
    (dict(sorted_keys=torch.full((4, 3), float("inf"))), ValueError, "keys contains NaN or infinite"),
    (dict(sorted_keys=torch.full((4, 3), 3e38)), ValueError, "too large"),
    (dict(sorted_keys=torch.randn(0, 3), key_offsets=torch.tensor([0, 0]), key_order=torch.zeros(0, dtype=torch.long)),
     ValueError, "keys is empty"),
    (dict(sorted_keys=torch.randn(4, 0)), ValueError, "keys has zero features"),
    (dict(sorted_keys=torch.randn(1, 4, 3)), ValueError, "keys must be a 2-D"),
    (dict(sorted_keys=torch.randn(4, 3).double()), TypeError, "keys must be float32"),
    (dict(sorted_keys=torch.randn(4, 3, device="meta")), RuntimeError, "keys must be on the CPU"),
    (dict(precision="fp64"), ValueError, "precision"),
    (dict(precision="fp16"), ValueError, "precision"),
])
def test_class_constructor_bad_inputs(change, exc, msg):
    with pytest.raises(exc, match=msg):
        _class(**change)


@pytest.mark.parametrize("call,exc,msg", [
    (lambda c: c.search(_nan_at((1, 5, 3), 7), ALPHA, None), ValueError, "queries contains NaN"),
    (lambda c: c.search(torch.full((1, 5, 3), float("inf")), ALPHA, None), ValueError,
     "queries contains NaN or infinite"),
    (lambda c: c.search(torch.full((1, 5, 3), 3e38), ALPHA, None), ValueError, "too large"),
    (lambda c: c.search(torch.randn(1, 5, 3), 0.0, None), ValueError, "alpha must be"),
    (lambda c: c.search(torch.randn(1, 5, 3), -1.0, None), ValueError, "alpha must be"),
    (lambda c: c.search(torch.randn(1, 5, 3), float("nan"), None), ValueError, "alpha must be"),
    (lambda c: c.search(torch.randn(1, 5, 3), float("inf"), None), ValueError, "alpha must be"),
    (lambda c: c.search(torch.randn(1, 5, 3), 1e-31, None), ValueError, "alpha must be"),
    (lambda c: c.search(torch.randn(1, 5, 3), 1e31, None), ValueError, "alpha must be"),
    (lambda c: c.search(torch.randn(1, 5, 2), ALPHA, None), ValueError, "D=2"),
    (lambda c: c.search(torch.randn(1, 5, 3).half(), ALPHA, None), TypeError, "queries are Half but the index's keys"),
    (lambda c: c.search(torch.randn(1, 5, 3).double(), ALPHA, None), TypeError, "queries must be float32"),
    (lambda c: c.search(torch.randn(5, 3), ALPHA, None), ValueError, "queries must be a 3-D"),
    (lambda c: c.search(torch.randn(1, 5, 3, device="meta"), ALPHA, None), RuntimeError,
     "queries must be on the CPU"),
    (lambda c: c.search(torch.randn(1, 5, 3), ALPHA, torch.zeros(1, 4, dtype=torch.long)), ValueError,
     r"hint must be \(B, N\)"),
    (lambda c: c.search(torch.randn(1, 5, 3), ALPHA, torch.zeros(5, dtype=torch.long)), ValueError,
     r"hint must be \(B, N\)"),
    (lambda c: c.search(torch.randn(1, 5, 3), ALPHA, torch.zeros(1, 5, dtype=torch.int32)), TypeError,
     "hint must be int64"),
    (lambda c: c.search(torch.randn(1, 5, 3), ALPHA, torch.full((1, 5), 4)), ValueError,
     r"hint values must be in \[0, 4\) \(key indices\)"),
    (lambda c: c.search(torch.randn(1, 5, 3), ALPHA, torch.full((1, 5), -1)), ValueError,
     r"hint values must be in \[0, 4\) \(key indices\)"),
])
def test_class_search_bad_inputs(call, exc, msg):
    with pytest.raises(exc, match=msg):
        call(_class())


def test_class_valid_base_args():
    # the base of the bad-input cases is itself valid, so each case fails for its own reason
    k = torch.randn(4, 3)
    c = torch.classes.fastgen.PatchIndex(k, torch.tensor([0, 2, 4]), torch.tensor([1, 0, 3, 2]), "fp32")
    assert (c.size(), c.dim(), c.clusters(), c.pairs()) == (4, 3, 2, (0, 0))
    assert_equal_idx(c.positions(), torch.tensor([1, 0, 3, 2]))  # id -> sorted position
    q = torch.randn(1, 5, 3)
    idx = c.search(q, ALPHA, None)
    assert idx.shape == (1, 5) and ((idx >= 0) & (idx < 4)).all()
    # answers are ids of the original keys: sorted key p is original key order[p]
    judge(q[0], k[torch.tensor([1, 0, 3, 2]).argsort()], ALPHA, idx[0])
    assert_equal_idx(c.search(q, ALPHA, torch.full((1, 5), 3)), idx)
    assert c.pairs()[0] == 2 * 2 * 5 * 4
    assert c.search(torch.randn(2, 0, 3), ALPHA, None).shape == (2, 0)
    assert c.search(torch.randn(0, 5, 3), ALPHA, None).shape == (0, 5)


def test_class_refuses_a_bound_table_near_n_by_m():
    # one key per cluster and half a million queries: the (query block x cluster) bound
    # table would pass 1 GB, so every pass refuses before allocating anything
    q = torch.zeros(32 * 2 ** 14, 1)
    k = torch.arange(2 ** 13 + 1, dtype=torch.float32)[:, None]
    m = k.shape[0]
    c = torch.classes.fastgen.PatchIndex(k, torch.arange(m + 1), torch.arange(m), "fp32")
    with pytest.raises(ValueError, match="too many key clusters"):
        c.search(q[None], ALPHA, None)
    with pytest.raises(ValueError, match="too many key clusters"):
        c.column_min(q, None, None)
    with pytest.raises(ValueError, match="too many key clusters"):
        c.weighted_argmin(q, torch.ones(m), None, None, None, None)
    assert c.pairs() == (0, 0)
    # fewer queries with the same clusters pass: every query sits at 0, key 0 is at 0,
    # so key 0's score 0 beats every other key's j^2 / (alpha + j^2)
    idx = c.search(q[None, :4096], ALPHA, None)
    assert idx.shape == (1, 4096) and bool((idx == 0).all())


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
    (lambda: PatchIndex(torch.randn(10, 3), cluster_size=0), ValueError, "cluster_size"),
    (lambda: pruned(torch.randn(10, 3)).search(torch.randn(5, 2)), ValueError, "D=2"),
    (lambda: pruned(torch.randn(10, 3)).search(torch.randn(5, 3).half()), TypeError, "queries is torch.float16"),
])
def test_cluster_keys_bad_inputs(call, exc, msg):
    with pytest.raises(exc, match=msg):
        call()


# ---------------------------------------------------------------------------------------
# Incremental searches: PatchIndex(keys, alpha) (incremental by default on the CPU)

def changed_rows(step, n):
    """Which queries change at each step: scattered, a contiguous region (as where GPNN's
    image changes), nothing, almost all, all."""
    kind = step % 5
    if kind == 0:
        return torch.randperm(n)[: max(1, n // 10)]
    if kind == 1:
        s = int(torch.randint(0, n, (1,)))
        return torch.arange(s, min(n, s + n // 4))
    if kind == 2:
        return torch.zeros(0, dtype=torch.long)
    if kind == 3:
        return torch.randperm(n)[: (9 * n) // 10]
    return torch.arange(n)


def evolve(q, k, idx, rows):
    """GPNN-like move of the given queries: towards the key they chose, plus noise."""
    q = q.clone()
    if rows.numel():
        noise = 0.02 * torch.randn(rows.numel(), q.shape[1]).to(q.dtype)
        q[rows] = (0.7 * q[rows].float() + 0.3 * k[idx[rows]].float()).to(q.dtype) + noise
    return q


def sequence_data(data):
    if data == "image":
        keys = image_patches((28, 40))                       # 748 patches, D = 147
        return keys + 0.05 * torch.randn_like(keys), keys
    return blobs(700, 900, 9, uncovered=4)                   # uncovered key blobs: small weights


@pytest.mark.parametrize("prune_shape", [None, FINE])
@pytest.mark.parametrize("data", ["image", "blobs-uncovered"])
@pytest.mark.parametrize("dtype,precision", [(torch.float32, "fp32"), (torch.float32, "bf16"),
                                             (torch.bfloat16, "bf16")])
def test_every_step_reaches_the_optimum(data, dtype, precision, prune_shape, monkeypatch):
    use_prune_shape(monkeypatch, prune_shape)
    q, k = sequence_data(data)
    q, k = q.to(dtype), k.to(dtype)
    index = PatchIndex(k, ALPHA, precision=precision)
    assert index.pruned and index.incremental
    steps, last = [], None
    for step in range(7):
        idx = index.search(q)
        s = index.stats
        steps.append(s.last_changed[0])
        assert s.searches == step + 1 and s.from_scratch + s.incremental == step + 1
        if last is not None:  # the fraction of the queries that differ from the last search's
            changed = (q != last).any(1).float().mean().item()
            assert steps[-1] == pytest.approx(changed) if changed <= index.full_above else steps[-1] is None
        judge(q, k, ALPHA, idx, precision)
        last = q
        q = evolve(q, k, idx, changed_rows(step, q.shape[0]))
    assert steps[0] is None                                   # the first search: from scratch
    assert any(c is not None for c in steps), "the incremental path never ran"
    assert any(c is None for c in steps[1:]), "no search after the first was from scratch"


@pytest.mark.parametrize("shape", [(1, 1, 1), (9, 4, 3), (130, 700, 16), (301, 100, 5)])
def test_equals_a_search_from_scratch_on_tie_free_data(shape):
    n, m, d = shape
    q, k = torch.randn(n, d), torch.randn(m, d)
    index, scratch = PatchIndex(k, 1.0, cluster_size=8), pruned(k, 1.0, cluster_size=8)
    for step in range(6):
        idx = index.search(q)
        full = scratch.search(q)
        clear = judge(q, k, 1.0, idx)
        assert_equal_idx(idx[clear], full[clear])
        q = evolve(q, k, idx, changed_rows(step, n))
    assert index.stats.incremental > 0 and scratch.stats.incremental == 0


@pytest.mark.parametrize("cluster_size", [1, 4, 128])
def test_exact_ties_go_to_the_lowest_index(cluster_size):
    # integer points: every distance, minimum and score is exact in fp32, so ties are
    # real; the incremental path (old answer kept against keys whose weight moved) must
    # break them like the full sweep, towards the lowest key index
    base = torch.randint(-2, 3, (60, 4)).float()
    keys = symmetric_integer_keys(torch.cat([base, base[torch.randint(0, 60, (40,))]]))
    keys = keys[torch.randperm(keys.shape[0])]
    q = torch.randint(-2, 3, (200, 4)).float()
    index = PatchIndex(keys, 0.5, cluster_size=cluster_size)
    for step in range(6):
        idx = index.search(q)
        d = sqdist64(q, keys).float()
        w = (d.min(0).values + 0.5).reciprocal()
        assert_equal_idx(idx, (d * w).argmin(1))
        rows = changed_rows(step, q.shape[0])
        q = q.clone()
        q[rows] = torch.randint(-2, 3, (rows.numel(), 4)).float()
    assert index.stats.incremental > 0


def test_updates_compute_less_than_a_full_search():
    keys = image_patches((48, 64))                          # 2494 patches
    q = keys + 0.05 * torch.randn(keys.shape)
    index, scratch = PatchIndex(keys, ALPHA), pruned(keys)
    idx = index.search(q)
    q0, q = q, evolve(q, keys, idx, torch.arange(200, 450))  # 10 % of the queries, one region
    changed = (q != q0).any(1).float().mean().item()

    def computed(ix, call):
        c0 = ix.stats.pairs_computed
        out = call()
        return out, ix.stats.pairs_computed - c0

    full, full_pairs = computed(scratch, lambda: scratch.search(q))
    inc, inc_pairs = computed(index, lambda: index.search(q))
    assert index.stats.last_changed == [pytest.approx(changed)] and 0 < changed <= 250 / q.shape[0]
    assert index.stats.incremental == 1
    assert 0 < inc_pairs < 0.5 * full_pairs, (inc_pairs, full_pairs)
    clear = judge(q, keys, ALPHA, inc)
    assert_equal_idx(inc[clear], full[clear])
    # unchanged queries again: nothing to search at all
    same, pairs = computed(index, lambda: index.search(q))
    assert pairs == 0 and torch.equal(same, inc)
    assert index.stats.last_changed == [0.0] and index.stats.incremental == 2


def test_full_above_decides_between_update_and_search_from_scratch():
    q, k = blobs(200, 300, 5)
    index = PatchIndex(k, ALPHA, full_above=0.5)
    index.search(q)
    q2 = q.clone()
    q2[:40] += 0.1                                          # 20 % changed: an update
    index.search(q2)
    assert index.stats.last_changed == [pytest.approx(0.2)]
    q3 = q2.clone()
    q3[:120] -= 0.1                                         # 60 % changed: from scratch
    idx = index.search(q3)
    assert index.stats.last_changed == [None]
    assert_equal_idx(idx, pruned(k).search(q3))
    never = PatchIndex(k, ALPHA, full_above=0.0)             # any change: from scratch
    never.search(q)
    never.search(q)
    assert never.stats.last_changed == [0.0]                # nothing changed: still an update
    never.search(q2)
    assert never.stats.last_changed == [None]
    always = PatchIndex(k, ALPHA, full_above=1.0)            # even all changed: an update
    always.search(q)
    idx = always.search(q + 0.05)
    assert always.stats.last_changed == [1.0]
    clear = judge(q + 0.05, k, ALPHA, idx)
    assert_equal_idx(idx[clear], pruned(k).search(q + 0.05)[clear])


def test_batched_equals_per_element_and_reset():
    q, k = blobs(300, 400, 6)
    qb = torch.stack([q, q + 0.1 * torch.randn(q.shape)])
    batched, singles = PatchIndex(k, ALPHA), [PatchIndex(k, ALPHA) for _ in range(2)]
    for step in range(3):
        out = batched.search(qb)
        assert out.shape == (2, 300)
        for b in range(2):
            assert_equal_idx(out[b], singles[b].search(qb[b]))
            judge(qb[b], k, ALPHA, out[b])
        assert len(batched.stats.last_changed) == 2
        assert batched.stats.last_changed == [s.stats.last_changed[0] for s in singles]
        qb = torch.stack([evolve(qb[b], k, out[b], changed_rows(step, 300)) for b in range(2)])
    assert batched.stats.incremental > 0
    batched.reset()
    assert batched.stats == PatchIndexStats()               # counters and pairs zeroed
    assert_equal_idx(batched.search(qb), torch.stack([pruned(k).search(qb[b]) for b in range(2)]))
    s = batched.stats
    assert s.last_changed == [None, None] and (s.searches, s.from_scratch, s.incremental) == (1, 2, 0)
    assert s.pairs_total == 2 * 2 * 300 * 400
    # another batch size: every element from scratch
    batched.search(qb[:1])
    assert batched.stats.last_changed == [None]


def test_empty_query_sets():
    index = PatchIndex(torch.randn(30, 4), ALPHA)
    for _ in range(2):                                           # again: the empty state is reused
        out = index.search(torch.randn(0, 4))
        assert out.shape == (0,) and out.dtype == torch.long
    assert index.search(torch.randn(0, 7, 4)).shape == (0, 7)   # no batch elements
    assert index.search(torch.randn(2, 0, 4)).shape == (2, 0)
    q = torch.randn(6, 4)                                        # and a real set after them
    assert_equal_idx(index.search(q), pruned(index.keys).search(q))


def test_hint_and_query_count_change():
    q, k = blobs(200, 300, 5)
    index = PatchIndex(k, ALPHA)
    first = index.search(q, hint=torch.zeros(200, dtype=torch.long))  # a poor hint: same answer
    assert_equal_idx(first, pruned(k).search(q))
    fewer = q[:150] + 0.01 * torch.randn(150, 5)                     # another query count: from scratch
    assert_equal_idx(index.search(fewer), pruned(k).search(fewer))
    assert index.stats.last_changed == [None]
    # the same count again with a hint: an update (the hint is only for searches from scratch)
    again = fewer.clone()
    again[:10] = q[150:160]
    got = index.search(again, hint=torch.randint(0, 300, (150,)))
    assert index.stats.last_changed == [pytest.approx(10 / 150)]
    clear = judge(again, k, ALPHA, got)
    assert_equal_idx(got[clear], pruned(k).search(again)[clear])


def test_reset_forgets_the_last_queries():
    q, k = blobs(100, 150, 4)
    index = PatchIndex(k, ALPHA)
    idx = index.search(q)
    index.search(q)
    assert index.stats.last_changed == [0.0]
    index.reset()
    assert index.stats == PatchIndexStats() and index.stats.fraction_computed is None
    assert_equal_idx(index.search(q), idx)
    assert index.stats.last_changed == [None] and index.stats.pairs_total == 2 * 100 * 150


# ---------------------------------------------------------------------------------------
# The class's pass methods on subsets (what the incremental updates compose):
# column_min(queries, init, keep) and weighted_argmin(queries, weights, hint, init_best,
# init_arg, keep). Keys are addressed by sorted positions there; answers are key ids.

def test_column_min_finds_the_covering_query():
    q, k = blobs(250, 320, 7)
    c, (sk, _, order) = cpp_index(k, cluster_size=16)
    colmin, colarg = c.column_min(q, None, None)
    d = sqdist64(q, sk)
    best = d.min(0).values
    tol = 1e-4 * (1 + best)
    assert ((colmin.double() - best).abs() <= tol).all()
    assert ((d.gather(0, colarg[None])[0] - best).abs() <= tol).all()    # colarg reaches it
    # a start value below the true minimum stands (-1), -inf never computes the key
    init = torch.where(torch.arange(320) % 3 == 0, (best / 2).float(), torch.full((320,), float("inf")))
    init[5] = float("-inf")
    c2, a2 = c.column_min(q, init, None)
    kept = torch.arange(320) % 3 == 0
    searched = ~kept
    searched[5] = False
    assert torch.equal(c2[kept], init[kept]) and (a2[kept] == -1).all()
    assert ((c2[searched].double() - best[searched]).abs() <= tol[searched]).all()
    assert ((d[a2[searched], searched.nonzero().flatten()] - best[searched]).abs() <= tol[searched]).all()
    assert c2[5] == float("-inf") and a2[5] == -1
    # a subset of the keys (ascending positions): init and the outputs over those keys
    keep = torch.randperm(320)[:97].sort().values
    c3, a3 = c.column_min(q, None, keep)
    assert c3.shape == a3.shape == (97,)
    assert ((c3.double() - best[keep]).abs() <= tol[keep]).all()
    assert ((d[a3, keep] - best[keep]).abs() <= tol[keep]).all()
    c4, a4 = c.column_min(q, init[keep].contiguous(), keep)
    assert torch.equal(c4, torch.minimum(c4, init[keep])) and (a4[kept[keep]] == -1).all()
    # a subset of the queries: their own minima
    c5, a5 = c.column_min(q[:50], None, None)
    assert ((c5.double() - d[:50].min(0).values).abs() <= 1e-4 * (1 + d[:50].min(0).values)).all()
    assert (a5 < 50).all()
    # no queries, or no keys: the start values (or infinity) and no covering query
    c0, a0 = c.column_min(q[:0], None, None)
    assert c0.shape == (320,) and torch.isinf(c0).all() and (a0 == -1).all()
    c0, a0 = c.column_min(q[:0], init, None)
    assert torch.equal(c0, init) and (a0 == -1).all()
    c0, a0 = c.column_min(q, None, keep[:0])
    assert c0.shape == a0.shape == (0,)
    assert order.shape == (320,)


def weighted_scores(q, k, positions, weights):
    """float64 scores d(q, k_j) * weights_j (N, len(positions)) of the keys at the given
    sorted positions of a class built on k (sorted), and per entry a bound on the fp32
    score's error (helpers.scores_and_errors with the weights given, not computed; the
    class centres every search near the mean of all its keys)."""
    sub = k[positions]
    s = sqdist64(q, sub) * weights.double()
    mu = k.double().mean(0)
    qn = (q.double() - mu).norm(dim=1)
    kmax = (k.double() - mu).norm(dim=1).max()
    e_d = (3 * q.shape[1] + 8) * 2.0 ** -24 * (qn + kmax) ** 2
    return s, e_d[:, None] * weights.double() + 4 * 2.0 ** -24 * s


def check_weighted_argmin(q, sk, order, positions, weights, idx, score):
    """idx (key ids) and score of weighted_argmin over the keys at `positions` (sorted,
    ascending) against float64: the score is the one the chosen key reaches, which is the
    optimum within rounding, and the index is the optimum's where it is clear."""
    s, sigma = weighted_scores(q, sk, positions, weights)
    col = torch.searchsorted(positions, torch.argsort(order)[idx])    # id -> column of s
    assert_equal_idx(positions[col], torch.argsort(order)[idx])       # the chosen keys are in the set
    reached, e_reached = s.gather(1, col[:, None])[:, 0], sigma.gather(1, col[:, None])[:, 0]
    best, arg = s.min(1)
    assert ((score.double() - reached).abs() <= 2 * e_reached).all()
    assert (reached <= best + 2 * (e_reached + sigma.gather(1, arg[:, None])[:, 0])).all()
    if s.shape[1] > 1:
        top2, j = s.topk(2, dim=1, largest=False)
        clear = (top2[:, 1] - top2[:, 0]) > 2 * sigma.gather(1, j).sum(1)
        assert clear.float().mean() > 0.5, "test data too tied to check indices"
        assert_equal_idx(idx[clear], order[positions][arg][clear])


def test_weighted_argmin_on_a_key_subset_keeps_a_better_start():
    q, k = blobs(200, 300, 6)
    c, (sk, _, order) = cpp_index(k, cluster_size=16)
    colmin, _ = c.column_min(q, None, None)
    w = (colmin + ALPHA).reciprocal()                                 # over sorted positions
    idx, score = c.weighted_argmin(q, w, None, None, None, None)
    assert_equal_idx(idx, c.search(q[None], ALPHA, None)[0])          # both passes, as search runs them
    assert_equal_idx(c.weighted_argmin(q, w, idx, None, None, None)[0], idx)   # a hint: the same answer
    check_weighted_argmin(q, sk, order, torch.arange(300), w, idx, score)
    # half the keys, each query starting from its full answer: nothing beats it
    keep = torch.arange(0, 300, 2)
    i2, s2 = c.weighted_argmin(q, w, None, score, idx, keep)         # weights: still all M
    assert (s2 <= score).all()
    # only a near-tie (within fp32 rounding of another GEMM shape) may move
    s64 = sqdist64(q, k) * (sqdist64(q, k).min(0).values + ALPHA).reciprocal()
    tol = fp32_allowance(q, k, ALPHA)
    moved = (i2 != idx).nonzero().flatten()
    assert (s64[moved, i2[moved]] <= s64[moved, idx[moved]] + 2 * tol[moved]).all()
    same = i2 == idx
    assert ((s2[same] - score[same]).abs() <= tol[same]).all()
    # a start that every key beats: the subset's own answer
    i3, s3 = c.weighted_argmin(q, w, None, torch.full((200,), 1e30), torch.zeros(200, dtype=torch.long), keep)
    i4, s4 = c.weighted_argmin(q, w, None, None, None, keep)
    assert_equal_idx(i3, i4)
    assert set(i4.tolist()) <= set(order[keep].tolist())
    # ... which is the subset's argmin with the subset's weights (the class gathers w[keep])
    check_weighted_argmin(q, sk, order, keep, w[keep], i4, s4)
    odd = torch.randperm(300)[:77].sort().values                      # an irregular subset
    i6, s6 = c.weighted_argmin(q, w, None, None, None, odd)
    check_weighted_argmin(q, sk, order, odd, w[odd], i6, s6)
    # an empty subset: the start stands
    i5, s5 = c.weighted_argmin(q, w, None, score, idx, keep[:0])
    assert torch.equal(i5, idx) and torch.equal(s5, score)


def _argmin_call(c, **change):
    """weighted_argmin with valid arguments (5 queries, 4 keys), some replaced."""
    args = dict(queries=torch.randn(5, 3), weights=torch.ones(4), hint=None, init_best=None, init_arg=None, keep=None)
    args.update(change)
    return c.weighted_argmin(*args.values())


@pytest.mark.parametrize("change,exc,msg", [
    (dict(weights=torch.ones(3)), ValueError, "weights must be a 1-D tensor of 4"),
    (dict(weights=torch.ones(2), keep=torch.tensor([0, 2])), ValueError, "weights must be a 1-D tensor of 4"),
    (dict(weights=torch.ones(4).double()), TypeError, "weights must be Float"),
    (dict(weights=torch.tensor([1.0, 0.0, 1.0, 1.0])), ValueError, "weights must be finite and > 0"),
    (dict(weights=torch.tensor([1.0, -1.0, 1.0, 1.0])), ValueError, "weights must be finite and > 0"),
    (dict(weights=torch.tensor([1.0, float("nan"), 1.0, 1.0])), ValueError, "weights must be finite"),
    (dict(weights=torch.tensor([1.0, float("inf"), 1.0, 1.0])), ValueError, "weights must be finite"),
    (dict(hint=torch.tensor([0, 1, 2, 3, 9])), ValueError, r"hint values must be in \[0, 4\) \(key indices\)"),
    (dict(hint=torch.tensor([0, 1, 2, 3, 2 ** 62])), ValueError, r"hint values must be in \[0, 4\)"),
    (dict(hint=torch.tensor([0, 1, -1, 3, 2])), ValueError, r"hint values must be in \[0, 4\)"),
    (dict(hint=torch.zeros(5, dtype=torch.int32)), TypeError, "hint must be Long"),
    (dict(hint=torch.zeros(4, dtype=torch.long)), ValueError, "hint must be a 1-D tensor of 5"),
    (dict(hint=torch.zeros(5, dtype=torch.long), init_best=torch.ones(5), init_arg=torch.zeros(5, dtype=torch.long)),
     ValueError, "hint and init_best/init_arg cannot be combined"),
    (dict(hint=torch.zeros(5, dtype=torch.long), keep=torch.tensor([0, 2])), ValueError,
     "hint and keep cannot be combined"),
    (dict(init_best=torch.ones(5)), ValueError, "init_best and init_arg go together"),
    (dict(init_arg=torch.zeros(5, dtype=torch.long)), ValueError, "init_best and init_arg go together"),
    (dict(init_best=torch.ones(5), init_arg=torch.zeros(4, dtype=torch.long)), ValueError, "init_arg must be a 1-D"),
    (dict(init_best=torch.ones(4), init_arg=torch.zeros(5, dtype=torch.long)), ValueError, "init_best must be a 1-D"),
    (dict(init_best=torch.ones(5).double(), init_arg=torch.zeros(5, dtype=torch.long)), TypeError,
     "init_best must be Float"),
    (dict(init_best=torch.full((5,), -1.0), init_arg=torch.zeros(5, dtype=torch.long)), ValueError,
     "init_best must be finite and >= 0"),
    (dict(init_best=torch.full((5,), float("inf")), init_arg=torch.zeros(5, dtype=torch.long)), ValueError,
     "init_best must be finite and >= 0"),
    (dict(init_best=torch.ones(5), init_arg=torch.full((5,), -1)), ValueError, r"init_arg values must be in \[0, "),
    (dict(init_best=torch.ones(5), init_arg=torch.full((5,), 100)), ValueError, r"init_arg values must be in \[0, "),
    (dict(keep=torch.zeros(0, dtype=torch.long)), ValueError, "keep is empty and no init_best/init_arg"),
    (dict(keep=torch.tensor([2, 0])), ValueError, "keep must be strictly ascending"),
    (dict(keep=torch.tensor([0, 4])), ValueError, r"keep values must be in \[0, 4\) \(key positions\)"),
    (dict(queries=torch.randn(1, 5, 3)), ValueError, "queries must be a 2-D"),
    (dict(queries=torch.randn(5, 2)), ValueError, "D=2"),
    (dict(queries=torch.randn(5, 3).bfloat16()), TypeError, "queries are BFloat16 but the index's keys"),
    (dict(queries=_nan_at((5, 3), 4)), ValueError, "queries contains NaN"),
])
def test_weighted_argmin_bad_inputs(change, exc, msg):
    with pytest.raises(exc, match=msg):
        _argmin_call(_class(), **change)


def test_weighted_argmin_valid_base_args():
    # the base of the bad-input cases is itself valid, so each case fails for its own reason
    c = _class()
    idx, score = _argmin_call(c)
    assert idx.shape == (5,) and set(idx.tolist()) <= {0, 1, 2, 3} and score.shape == (5,)
    assert (score >= 0).all()
    # a subset: ids of the kept keys only (positions 0 and 2 hold keys 1 and 3)
    idx, _ = _argmin_call(c, keep=torch.tensor([0, 2]))
    assert set(idx.tolist()) <= {1, 3}
    idx, _ = _argmin_call(c, keep=torch.tensor([0, 2]), init_best=torch.full((5,), 1e30),
                          init_arg=torch.zeros(5, dtype=torch.long))
    assert set(idx.tolist()) <= {1, 3}
    # no queries: nothing to check the start against
    idx, score = _argmin_call(c, queries=torch.randn(0, 3))
    assert idx.shape == score.shape == (0,)


@pytest.mark.parametrize("init,keep,queries,exc,msg", [
    (torch.ones(3), None, (5, 3), ValueError, "init must be a 1-D tensor of 4"),
    (torch.ones(4), torch.tensor([0, 2]), (5, 3), ValueError, "init must be a 1-D tensor of 2"),
    (torch.ones(4, dtype=torch.float64), None, (5, 3), TypeError, "init must be Float"),
    (torch.tensor([1.0, float("nan"), 1.0, 1.0]), None, (5, 3), ValueError, "init must not contain NaN"),
    (None, torch.tensor([[0, 2]]), (5, 3), ValueError, "keep must be a 1-D tensor of key positions"),
    (None, torch.tensor([2, 0]), (5, 3), ValueError, "keep must be strictly ascending"),
    (None, torch.tensor([1, 1]), (5, 3), ValueError, "keep must be strictly ascending"),
    (None, torch.tensor([1, 4]), (5, 3), ValueError, r"keep values must be in \[0, 4\) \(key positions\)"),
    (None, torch.tensor([-1, 2]), (5, 3), ValueError, r"keep values must be in \[0, 4\)"),
    (None, torch.tensor([0, 2], dtype=torch.int32), (5, 3), TypeError, "keep must be int64"),
    (None, torch.tensor([0, 2], device="meta"), (5, 3), RuntimeError, "keep must be on the CPU"),
    (None, None, (1, 5, 3), ValueError, "queries must be a 2-D"),
    (None, None, (5, 2), ValueError, "D=2"),
])
def test_column_min_bad_inputs(init, keep, queries, exc, msg):
    with pytest.raises(exc, match=msg):
        _class().column_min(torch.randn(*queries), init, keep)


def test_column_min_valid_base_args():
    c = _class()
    colmin, colarg = c.column_min(torch.randn(5, 3), torch.ones(4), None)
    assert colmin.shape == colarg.shape == (4,) and (colmin <= 1).all()
    colmin, colarg = c.column_min(torch.randn(5, 3), torch.ones(2), torch.tensor([0, 2]))
    assert colmin.shape == colarg.shape == (2,) and (colarg < 5).all()


def _nan_on_second_search(index):
    q = torch.randn(8, 3)
    index.search(q)
    q[3, 1] = float("nan")              # one changed query: the incremental path must refuse it
    index.search(q)


@pytest.mark.parametrize("call,exc,msg", [
    (lambda k: PatchIndex(k, ALPHA, backend="torch", incremental=True), ValueError, "incremental=True needs"),
    (lambda k: PatchIndex(k, None, incremental=True), ValueError, "incremental=True needs"),
    (lambda k: PatchIndex(k, ALPHA, prune=False, incremental=True), ValueError, "incremental=True needs"),
    (lambda k: PatchIndex(k, None, prune=True), ValueError, "prune=True needs"),
    (lambda k: PatchIndex(k, ALPHA, backend="torch", prune=True), ValueError, "prune=True needs"),
    (lambda k: PatchIndex(k, ALPHA, prune=1), TypeError, "prune must be True, False or None"),
    (lambda k: PatchIndex(k, ALPHA, incremental="yes"), TypeError, "incremental must be True, False or None"),
    (lambda k: PatchIndex(k, 0.0), ValueError, "alpha"),
    (lambda k: PatchIndex(k, True), TypeError, "alpha"),
    (lambda k: PatchIndex(k, ALPHA, precision="fp64"), ValueError, "precision"),
    (lambda k: PatchIndex(k, ALPHA, backend="torch", precision="bf16"), ValueError, "runs on the cpp and triton backends only"),
    (lambda k: PatchIndex(k, ALPHA, full_above=1.5), ValueError, "full_above"),
    (lambda k: PatchIndex(k, ALPHA, full_above=-0.1), ValueError, "full_above"),
    (lambda k: PatchIndex(k, ALPHA, max_key_bytes=0), ValueError, "max_key_bytes"),
    (lambda k: PatchIndex(k, ALPHA, backend="cuda"), ValueError, "backend"),
    (lambda k: PatchIndex(k[:0], ALPHA), ValueError, "keys is empty"),
    (lambda k: PatchIndex(k[None], ALPHA), ValueError, "keys must be 2-D"),
    (lambda k: PatchIndex(k.double(), ALPHA), TypeError, "keys must be float32"),
    (lambda k: PatchIndex(k.tolist(), ALPHA), TypeError, "keys must be a torch.Tensor"),
    (lambda k: PatchIndex(torch.full((20, 3), float("nan")), ALPHA), ValueError, "keys contains NaN"),
    (lambda k: PatchIndex(k.to("meta"), ALPHA), ValueError, "CPU or CUDA"),
    (lambda k: PatchIndex(k, ALPHA).search(torch.randn(5, 4)), ValueError, "D=4"),
    (lambda k: PatchIndex(k, ALPHA).search(torch.randn(3)), ValueError, "queries must be 2-D or 3-D"),
    (lambda k: PatchIndex(k, ALPHA).search(torch.full((5, 3), float("nan"))), ValueError, "queries"),
    (lambda k: PatchIndex(k, ALPHA, incremental=False).search(torch.full((5, 3), float("nan"))), ValueError,
     "queries contains NaN"),
    (lambda k: PatchIndex(k, ALPHA).search(torch.randn(5, 3).double()), TypeError, "queries"),
    (lambda k: PatchIndex(k, ALPHA).search(torch.randn(5, 3), hint=torch.zeros(4, dtype=torch.long)),
     ValueError, "hint must have shape"),
    (lambda k: PatchIndex(k, ALPHA).search(torch.full((5, 3), 3e38)), ValueError, "too large"),
    (lambda k: _nan_on_second_search(PatchIndex(k, ALPHA)), ValueError, "queries contains NaN"),
])
def test_index_bad_inputs(call, exc, msg):
    k = torch.randn(20, 3)
    with pytest.raises(exc, match=msg):
        call(k)


@pytest.mark.parametrize("kw,pruned_,incremental_,mode", [
    (dict(), True, True, "incremental"),
    (dict(incremental=False), True, False, "pruned"),
    (dict(prune=True, incremental=True), True, True, "incremental"),
    (dict(prune=False), False, False, "sweep"),
    (dict(alpha=None), False, False, "sweep"),
    (dict(backend="torch"), False, False, "sweep"),
])
def test_index_modes(kw, pruned_, incremental_, mode):
    index = PatchIndex(torch.randn(20, 3), **{"alpha": ALPHA, **kw})
    assert (index.pruned, index.incremental) == (pruned_, incremental_)
    assert f"mode={mode!r}" in repr(index)


@pytest.mark.parametrize("incremental", [True, False])
def test_a_refused_search_is_not_counted(incremental):
    keys = torch.randn(60, 5)
    index = PatchIndex(keys, 0.5, incremental=incremental)
    q = torch.randn(40, 5)
    index.search(q)
    before = index.stats
    bad = q.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match="queries contains NaN"):
        index.search(bad)
    after = index.stats
    assert (after.searches, after.from_scratch, after.incremental, after.last_changed) == \
        (before.searches, before.from_scratch, before.incremental, before.last_changed)


@pytest.mark.parametrize("prune", [True, False])
def test_keys_edited_in_place_after_building_are_refused(prune):
    """An index answers from its prepared copy: keys edited in place afterwards would give
    wrong answers silently (issue 13), so the next search refuses."""
    keys = torch.rand(300, 12)
    index = PatchIndex(keys, 0.01, prune=prune, backend="cpp")
    index.search(torch.rand(50, 12))
    keys[3] += 1.0
    with pytest.raises(RuntimeError, match="modified in place"):
        index.search(torch.rand(50, 12))
    fresh = PatchIndex(keys.clone(), 0.01, prune=prune, backend="cpp")    # a new index is fine
    assert torch.equal(fresh.search(keys[:40]), patch_nn(keys[:40], keys, 0.01, backend="cpp", prune=prune))


@pytest.mark.parametrize("prune", [True, False])
@pytest.mark.parametrize("how", ["data", "data-other-shape", "numpy-element", "numpy-row-swap", "numpy-offsample"])
def test_keys_changed_behind_the_version_counter_are_refused(prune, how):
    """Writes through keys.data or keys.numpy() do not bump the version counter: the index
    answered every query for the old keys (hostile review); its fingerprint now refuses."""
    torch.manual_seed(0)
    keys = torch.rand(2000, 12)
    index = PatchIndex(keys, 0.01, prune=prune, backend="cpp")
    q = torch.rand(200, 12)
    index.search(q)
    version = keys._version
    if how == "data":
        keys.data = torch.rand(2000, 12)
    elif how == "data-other-shape":
        keys.data = torch.rand(1500, 12)
    elif how == "numpy-element":
        keys.numpy()[1234, 5] += 0.25
    elif how == "numpy-row-swap":
        a = keys.numpy()
        a[[10, 1900]] = a[[1900, 10]]
    else:   # one element the strided sample does not cover: the checksums see it
        fp = index._keys_print
        sampled = set((fp._rows * 12 + fp._cols).tolist())
        pos = next(p for p in range(1, keys.numel()) if p not in sampled)
        keys.numpy().reshape(-1)[pos] += 1e-3
    assert keys._version == version          # the version counter saw none of it
    with pytest.raises(RuntimeError, match="keys of this PatchIndex changed after it was built"):
        index.search(q)


def test_unchanged_keys_pass_the_fingerprint_at_any_thread_count():
    """No false alarm: the checksums are compared within rounding, so a reduction order
    that changes with the thread count does not refuse unchanged keys."""
    keys = torch.randn(3000, 27) * 1e3 + 5e3
    index = PatchIndex(keys, 0.01, prune=True, backend="cpp")
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, before):
            torch.set_num_threads(threads)
            assert not index._keys_print.changed(keys)
    finally:
        torch.set_num_threads(before)
    index.search(torch.randn(30, 27) * 1e3 + 5e3)
    t = torch.randn(40, 9)[:, ::2]                  # a strided (non-contiguous) tensor
    assert not type(index._keys_print)(t).changed(t.clone())
