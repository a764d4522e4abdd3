"""fastgen.ops.patch_nn.IncrementalPatchNN and the two pass ops it composes
(fastgen::patch_nn_colmin, fastgen::patch_nn_argmin), against the float64 ground truth.

Every call of the tracker must return what patch_nn returns: judged like patch_nn's
own answers (test_patch_nn.judge: the float64 score each chosen key reaches is the
optimum within fp32/bf16 rounding, and the index is the optimum's wherever the optimum
is clear of the runner-up), on sequences of query sets where some queries change per
step as in GPNN: none, a few, a region, most, all.
"""
import pytest
import torch

from fastgen.ops.patch_nn import IncrementalPatchNN, cluster_keys, patch_nn, prune_stats
from helpers import assert_equal_idx
from test_patch_nn import FINE, blobs, fp32_allowance, image_patches, judge, sqdist64, symmetric_integer_keys, use_prune_shape

ALPHA = 0.005


def changed_rows(step, n, gen):
    """Which queries change at each step: scattered, a contiguous region (as where GPNN's
    image changes), nothing, almost all, all."""
    kind = step % 5
    if kind == 0:
        return torch.randperm(n, generator=gen)[: max(1, n // 10)]
    if kind == 1:
        s = int(torch.randint(0, n, (1,), generator=gen))
        return torch.arange(s, min(n, s + n // 4))
    if kind == 2:
        return torch.zeros(0, dtype=torch.long)
    if kind == 3:
        return torch.randperm(n, generator=gen)[: (9 * n) // 10]
    return torch.arange(n)


def evolve(q, k, idx, rows, gen):
    """GPNN-like move of the given queries: towards the key they chose, plus noise."""
    q = q.clone()
    if rows.numel():
        noise = 0.02 * torch.randn(rows.numel(), q.shape[1], generator=gen).to(q.dtype)
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
    torch.manual_seed(1)   # blobs() and image noise draw from the global generator
    gen = torch.Generator().manual_seed(1)
    q, k = sequence_data(data)
    q, k = q.to(dtype), k.to(dtype)
    tracker = IncrementalPatchNN(cluster_keys(k), ALPHA, precision)
    kinds = set()
    for step in range(7):
        idx = tracker(q)
        kinds.add(tracker.last_changed[0] is None)
        judge(q, k, ALPHA, idx, precision)
        q = evolve(q, k, idx, changed_rows(step, q.shape[0], gen), gen)
    assert kinds == {True, False}, "both the full and the incremental path must have run"


@pytest.mark.parametrize("shape", [(1, 1, 1), (9, 4, 3), (130, 700, 16), (301, 100, 5)])
def test_equals_patch_nn_on_tie_free_data(shape):
    n, m, d = shape
    torch.manual_seed(2)   # blobs() and image noise draw from the global generator
    gen = torch.Generator().manual_seed(2)
    q, k = torch.randn(n, d, generator=gen), torch.randn(m, d, generator=gen)
    kc = cluster_keys(k, cluster_size=8)
    tracker = IncrementalPatchNN(kc, 1.0)
    for step in range(6):
        idx = tracker(q)
        full = patch_nn(q, kc, 1.0)
        clear = judge(q, k, 1.0, idx)
        assert_equal_idx(idx[clear], full[clear])
        q = evolve(q, k, idx, changed_rows(step, n, gen), gen)


@pytest.mark.parametrize("cluster_size", [1, 4, 128])
def test_exact_ties_go_to_the_lowest_index(cluster_size):
    # integer points: every distance, minimum and score is exact in fp32, so ties are
    # real; the incremental path (old answer kept against keys whose weight moved) must
    # break them like the full sweep, towards the lowest key index
    torch.manual_seed(3)   # blobs() and image noise draw from the global generator
    gen = torch.Generator().manual_seed(3)
    base = torch.randint(-2, 3, (60, 4), generator=gen).float()
    keys = symmetric_integer_keys(torch.cat([base, base[torch.randint(0, 60, (40,), generator=gen)]]))
    keys = keys[torch.randperm(keys.shape[0], generator=gen)]
    q = torch.randint(-2, 3, (200, 4), generator=gen).float()
    tracker = IncrementalPatchNN(cluster_keys(keys, cluster_size=cluster_size), 0.5)
    for step in range(6):
        idx = tracker(q)
        d = sqdist64(q, keys).float()
        w = (d.min(0).values + 0.5).reciprocal()
        assert_equal_idx(idx, (d * w).argmin(1))
        rows = changed_rows(step, q.shape[0], gen)
        q = q.clone()
        q[rows] = torch.randint(-2, 3, (rows.numel(), 4), generator=gen).float()


def test_updates_compute_less_than_a_full_search():
    keys = image_patches((48, 64))                          # 2494 patches
    torch.manual_seed(4)   # blobs() and image noise draw from the global generator
    gen = torch.Generator().manual_seed(4)
    q = keys + 0.05 * torch.randn(keys.shape, generator=gen)
    kc = cluster_keys(keys)
    tracker = IncrementalPatchNN(kc, ALPHA)
    idx = tracker(q)
    q = evolve(q, keys, idx, torch.arange(200, 450), gen)   # 10 % of the queries, one region

    def computed(call):
        c0 = prune_stats()[1]
        out = call()
        return out, prune_stats()[1] - c0

    full, full_pairs = computed(lambda: patch_nn(q, kc, ALPHA))
    inc, inc_pairs = computed(lambda: tracker(q))
    assert tracker.last_changed == [pytest.approx(250 / q.shape[0])]
    assert inc_pairs < 0.5 * full_pairs, (inc_pairs, full_pairs)
    clear = judge(q, keys, ALPHA, inc)
    assert_equal_idx(inc[clear], full[clear])
    # unchanged queries again: nothing to search at all
    same, pairs = computed(lambda: tracker(q))
    assert pairs == 0 and torch.equal(same, inc)


def test_batched_equals_per_element_and_reset():
    torch.manual_seed(5)   # blobs() and image noise draw from the global generator
    gen = torch.Generator().manual_seed(5)
    q, k = blobs(300, 400, 6)
    kc = cluster_keys(k)
    qb = torch.stack([q, q + 0.1 * torch.randn(q.shape, generator=gen)])
    batched, singles = IncrementalPatchNN(kc, ALPHA), [IncrementalPatchNN(kc, ALPHA) for _ in range(2)]
    for step in range(3):
        out = batched(qb)
        assert out.shape == (2, 300)
        for b in range(2):
            assert_equal_idx(out[b], singles[b](qb[b]))
        qb = torch.stack([evolve(qb[b], k, out[b], changed_rows(step, 300, gen), gen) for b in range(2)])
    batched.reset()
    assert_equal_idx(batched(qb), torch.stack([patch_nn(qb[b], kc, ALPHA) for b in range(2)]))
    assert batched.last_changed == [None, None]


def test_empty_query_sets():
    kc = cluster_keys(torch.randn(30, 4))
    tracker = IncrementalPatchNN(kc, ALPHA)
    for _ in range(2):                                           # again: the empty state is reused
        out = tracker(torch.randn(0, 4))
        assert out.shape == (0,) and out.dtype == torch.long
    assert tracker(torch.randn(0, 7, 4)).shape == (0, 7)         # no batch elements
    assert tracker(torch.randn(2, 0, 4)).shape == (2, 0)


def test_hint_and_query_count_change():
    torch.manual_seed(6)   # blobs() and image noise draw from the global generator
    gen = torch.Generator().manual_seed(6)
    q, k = blobs(200, 300, 5)
    kc = cluster_keys(k)
    tracker = IncrementalPatchNN(kc, ALPHA)
    first = tracker(q, hint=torch.zeros(200, dtype=torch.long))    # a poor hint: same answer
    assert_equal_idx(first, patch_nn(q, kc, ALPHA))
    fewer = q[:150] + 0.01 * torch.randn(150, 5, generator=gen)     # another query count: from scratch
    assert_equal_idx(tracker(fewer), patch_nn(fewer, kc, ALPHA))
    assert tracker.last_changed == [None]


def test_colmin_op_finds_the_covering_query():
    torch.manual_seed(7)   # blobs() and image noise draw from the global generator
    gen = torch.Generator().manual_seed(7)
    q, k = blobs(250, 320, 7)
    kc = cluster_keys(k, cluster_size=16)
    sk = kc.sorted_keys
    colmin, colarg = torch.ops.fastgen.patch_nn_colmin(q, sk, kc.offsets, "fp32", None)
    d = sqdist64(q, sk)
    best = d.min(0).values
    tol = 1e-4 * (1 + best)
    assert ((colmin.double() - best).abs() <= tol).all()
    assert ((d.gather(0, colarg[None])[0] - best).abs() <= tol).all()    # colarg reaches it
    # a start value below the true minimum stands (-1), -inf never computes the key
    init = torch.where(torch.arange(320) % 3 == 0, (best / 2).float(), torch.full((320,), float("inf")))
    init[5] = float("-inf")
    c2, a2 = torch.ops.fastgen.patch_nn_colmin(q, sk, kc.offsets, "fp32", init)
    kept = torch.arange(320) % 3 == 0
    searched = ~kept
    searched[5] = False
    assert torch.equal(c2[kept], init[kept]) and (a2[kept] == -1).all()
    assert ((c2[searched].double() - best[searched]).abs() <= tol[searched]).all()
    assert ((d[a2[searched], searched.nonzero().flatten()] - best[searched]).abs() <= tol[searched]).all()
    assert c2[5] == float("-inf") and a2[5] == -1
    # no queries: the start values (or infinity) and no covering query
    c0, a0 = torch.ops.fastgen.patch_nn_colmin(q[:0], sk, kc.offsets, "fp32", None)
    assert torch.isinf(c0).all() and (a0 == -1).all()


def test_argmin_op_on_a_key_subset_keeps_a_better_start():
    torch.manual_seed(8)   # blobs() and image noise draw from the global generator
    gen = torch.Generator().manual_seed(8)
    q, k = blobs(200, 300, 6)
    kc = cluster_keys(k, cluster_size=16)
    colmin, _ = torch.ops.fastgen.patch_nn_colmin(q, kc.sorted_keys, kc.offsets, "fp32", None)
    w = (colmin + ALPHA).reciprocal()
    idx, score = torch.ops.fastgen.patch_nn_argmin(q, kc.sorted_keys, kc.offsets, kc.order, w, "fp32")
    assert_equal_idx(idx, patch_nn(q, kc, ALPHA))
    ref = (sqdist64(q, kc.sorted_keys) * w.double()).min(1).values
    assert ((score.double() - ref).abs() <= 1e-4 * (1 + ref)).all()
    # half the keys, each query starting from its full answer: nothing beats it
    keep = torch.arange(0, 300, 2)
    counts = torch.bincount(torch.repeat_interleave(torch.arange(kc.offsets.numel() - 1),
                                                    kc.offsets[1:] - kc.offsets[:-1])[keep],
                            minlength=kc.offsets.numel() - 1)
    off = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(counts, 0)])
    sub = (q, kc.sorted_keys[keep].contiguous(), off, kc.order[keep].contiguous(), w[keep].contiguous(), "fp32")
    centre = kc.sorted_keys.unsqueeze(0).mean(1)[0].contiguous()    # the full set's, as the op's own
    i2, s2 = torch.ops.fastgen.patch_nn_argmin(*sub, None, score, idx, centre)
    assert (s2 <= score).all()
    # only a near-tie (within fp32 rounding of another GEMM shape) may move
    s64 = sqdist64(q, k) * (sqdist64(q, k).min(0).values + ALPHA).reciprocal()
    moved = (i2 != idx).nonzero().flatten()
    assert (s64[moved, i2[moved]] <= s64[moved, idx[moved]] + 2 * fp32_allowance(q, k, ALPHA)[moved]).all()
    same = i2 == idx
    tol = fp32_allowance(q, k, ALPHA)                                # another GEMM shape rounds otherwise
    assert ((s2[same] - score[same]).abs() <= tol[same]).all()
    # a start that every key beats: the subset's own answer
    i3, s3 = torch.ops.fastgen.patch_nn_argmin(*sub, None, torch.full((200,), 1e30), torch.zeros(200, dtype=torch.long))
    i4, _ = torch.ops.fastgen.patch_nn_argmin(*sub)
    assert_equal_idx(i3, i4)
    assert set(i4.tolist()) <= set(kc.order[keep].tolist())


def _argmin_args(**change):
    """Valid arguments of patch_nn_argmin (4 keys in 2 clusters), with some replaced."""
    args = dict(queries=torch.randn(5, 3), keys=torch.randn(4, 3), key_offsets=torch.tensor([0, 2, 4]),
                key_order=torch.tensor([1, 0, 3, 2]), weights=torch.ones(4), precision="fp32", hint=None,
                init_best=None, init_arg=None, centre=None)
    args.update(change)
    return tuple(args.values())


@pytest.mark.parametrize("change,exc,msg", [
    (dict(weights=torch.ones(3)), ValueError, "weights must be a 1-D tensor of 4"),
    (dict(weights=torch.ones(4).double()), TypeError, "weights must be Float"),
    (dict(weights=torch.tensor([1.0, 0.0, 1.0, 1.0])), ValueError, "weights must be finite and > 0"),
    (dict(weights=torch.tensor([1.0, float("nan"), 1.0, 1.0])), ValueError, "weights must be finite"),
    (dict(key_order=torch.tensor([1, 1, 3, 2])), ValueError, "key_order must hold distinct"),
    (dict(key_order=torch.tensor([1, 0, 3, -2])), ValueError, "key_order must hold key ids >= 0"),
    (dict(hint=torch.tensor([0, 1, 2, 3, 9])), ValueError, "hint names key 9"),
    (dict(hint=torch.tensor([0, 1, 2, 3, 2 ** 62])), ValueError, "hint names key"),
    (dict(hint=torch.zeros(5, dtype=torch.long), init_best=torch.ones(5), init_arg=torch.zeros(5, dtype=torch.long)),
     ValueError, "hint and init_best/init_arg cannot be combined"),
    (dict(centre=torch.zeros(2)), ValueError, "centre must be a 1-D tensor of 3"),
    (dict(centre=torch.tensor([0.0, float("inf"), 0.0])), ValueError, "centre must be finite"),
    (dict(queries=torch.randn(0, 3), centre=torch.zeros(2)), ValueError, "centre must be a 1-D tensor of 3"),
    (dict(hint=torch.zeros(4, dtype=torch.long)), ValueError, "hint must be a 1-D tensor of 5"),
    (dict(init_best=torch.ones(5)), ValueError, "init_best and init_arg go together"),
    (dict(init_best=torch.ones(5), init_arg=torch.zeros(4, dtype=torch.long)), ValueError, "init_arg must be a 1-D"),
    (dict(init_best=torch.full((5,), -1.0), init_arg=torch.zeros(5, dtype=torch.long)), ValueError,
     "init_best must be finite and >= 0"),
    (dict(init_best=torch.ones(5), init_arg=torch.full((5,), -1)), ValueError, "init_arg must be key indices"),
    (dict(queries=torch.randn(1, 5, 3)), ValueError, "queries must be a 2-D"),
    (dict(keys=torch.randn(4, 2)), ValueError, "D=3"),
    (dict(precision="fp16"), ValueError, "precision"),
    (dict(key_offsets=torch.tensor([0, 2, 5])), ValueError, "key_offsets must start at 0 and end"),
])
def test_argmin_op_bad_inputs(change, exc, msg):
    with pytest.raises(exc, match=msg):
        torch.ops.fastgen.patch_nn_argmin(*_argmin_args(**change))


def test_argmin_op_valid_base_args():
    # the base of the bad-input cases is itself valid, so each case fails for its own reason
    idx, score = torch.ops.fastgen.patch_nn_argmin(*_argmin_args())
    assert idx.shape == (5,) and set(idx.tolist()) <= {0, 1, 2, 3} and score.shape == (5,)
    idx, _ = torch.ops.fastgen.patch_nn_argmin(*_argmin_args(key_order=torch.tensor([10, 2 ** 40, 7, 3]),
                                                             hint=torch.full((5,), 2 ** 40)))
    assert set(idx.tolist()) <= {10, 2 ** 40, 7, 3}                # ids of a subset, any size


@pytest.mark.parametrize("init,centre,queries,exc,msg", [
    (torch.ones(3), None, 5, ValueError, "init must be a 1-D tensor of 4"),
    (torch.ones(4, dtype=torch.float64), None, 5, TypeError, "init must be Float"),
    (torch.tensor([1.0, float("nan"), 1.0, 1.0]), None, 5, ValueError, "init must not contain NaN"),
    (None, torch.zeros(4), 5, ValueError, "centre must be a 1-D tensor of 3"),
    (None, torch.zeros(4), 0, ValueError, "centre must be a 1-D tensor of 3"),
    (None, torch.tensor([float("nan"), 0.0, 0.0]), 5, ValueError, "centre must be finite"),
])
def test_colmin_op_bad_inputs(init, centre, queries, exc, msg):
    with pytest.raises(exc, match=msg):
        torch.ops.fastgen.patch_nn_colmin(torch.randn(queries, 3), torch.randn(4, 3), torch.tensor([0, 2, 4]), "fp32",
                                          init, centre)


def _nan_on_second_call(tracker):
    q = torch.randn(8, 3)
    tracker(q)
    q[3, 1] = float("nan")              # one changed query: the incremental path must refuse it
    tracker(q)


@pytest.mark.parametrize("call,exc,msg", [
    (lambda kc: IncrementalPatchNN(kc.keys, ALPHA), TypeError, "keys must be a KeyClusters"),
    (lambda kc: IncrementalPatchNN(kc, None), ValueError, "alpha"),
    (lambda kc: IncrementalPatchNN(kc, 0.0), ValueError, "alpha"),
    (lambda kc: IncrementalPatchNN(kc, ALPHA, precision="fp64"), ValueError, "precision"),
    (lambda kc: IncrementalPatchNN(kc, ALPHA, full_above=1.5), ValueError, "full_above"),
    (lambda kc: IncrementalPatchNN(kc, ALPHA)(torch.randn(5, 4)), ValueError, "D"),
    (lambda kc: IncrementalPatchNN(kc, ALPHA)(torch.full((5, 3), float("nan"))), ValueError, "queries"),
    (lambda kc: IncrementalPatchNN(kc, ALPHA)(torch.randn(5, 3).double()), TypeError, "queries"),
    (lambda kc: IncrementalPatchNN(kc, ALPHA)(torch.randn(5, 3), hint=torch.zeros(4, dtype=torch.long)),
     ValueError, "hint must have shape"),
    (lambda kc: IncrementalPatchNN(kc, ALPHA)(torch.full((5, 3), 3e38)), ValueError, "too large"),
    (lambda kc: _nan_on_second_call(IncrementalPatchNN(kc, ALPHA)), ValueError, "queries contains NaN"),
])
def test_tracker_bad_inputs(call, exc, msg):
    kc = cluster_keys(torch.randn(20, 3))
    with pytest.raises(exc, match=msg):
        call(kc)


def test_pass_ops_opcheck():
    torch.manual_seed(9)   # blobs() and image noise draw from the global generator
    gen = torch.Generator().manual_seed(9)
    q, k = blobs(60, 80, 4)
    kc = cluster_keys(k, cluster_size=8)
    init = torch.rand(80, generator=gen)
    torch.library.opcheck(torch.ops.fastgen.patch_nn_colmin.default, (q, kc.sorted_keys, kc.offsets, "fp32", init))
    w = torch.rand(80, generator=gen) + 0.5
    torch.library.opcheck(torch.ops.fastgen.patch_nn_argmin.default,
                          (q, kc.sorted_keys, kc.offsets, kc.order, w, "fp32", kc.order[:60].contiguous()))
    centre = kc.sorted_keys.mean(0)
    torch.library.opcheck(torch.ops.fastgen.patch_nn_argmin.default,
                          (q, kc.sorted_keys, kc.offsets, kc.order, w, "fp32", None, torch.full((60,), 5.0),
                           torch.zeros(60, dtype=torch.long), centre))
    torch.library.opcheck(torch.ops.fastgen.patch_nn_colmin.default,
                          (q, kc.sorted_keys, kc.offsets, "fp32", None, centre))
