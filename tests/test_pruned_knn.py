"""Pruned exact knn (fastgen/ops/pruned_knn.py): the same answer as the full search and
the float64 reference, on data where pruning skips work and on data where it cannot."""
import math

import pytest
import torch

from fastgen.ops import StreamingKNN, knn
from fastgen.ops import pruned_knn as P
from fastgen.ops.reference import knn_exact


def blobs(n, d, centres=12, spread=0.05, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(centres, d, generator=g) * 3
    x = c[torch.randint(centres, (n,), generator=g)] + spread * torch.randn(n, d, generator=g)
    return x.to(dtype)


def data(kind, n, m, d, seed, dtype=torch.float32):
    if kind == "clustered":
        both = blobs(n + m, d, seed=seed, dtype=dtype)
        return both[:n].contiguous(), both[n:].contiguous()
    if kind == "duplicated":        # keys repeat exactly: ties must go to the lowest index
        q, k = data("clustered", n, m // 3 + 1, d, seed, dtype)
        return q, torch.cat([k, k, k])[:m].contiguous()
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g).to(dtype), torch.randn(m, d, generator=g).to(dtype)


@pytest.mark.parametrize("kind", ["clustered", "duplicated", "random"])
@pytest.mark.parametrize("k", [1, 3, 10])
def test_pruned_equals_reference_and_sweep(kind, k):
    q, keys = data(kind, 700, 1500, 19, seed=k)
    got = knn(q, keys, k, prune=True)
    sweep = knn(q, keys, k, prune=False)
    ref_d, ref_i = knn_exact(q, keys, k)
    assert torch.equal(got.idx, ref_i[0] if ref_i.dim() == 3 else ref_i)
    assert torch.equal(got.idx, sweep.idx) and torch.equal(got.dist, sweep.dist)
    torch.testing.assert_close(got.dist.double(), (ref_d[0] if ref_d.dim() == 3 else ref_d), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype,precision", [(torch.float16, "fp32"), (torch.bfloat16, "fp32"),
                                             (torch.float32, "bf16")])
def test_pruned_dtypes_and_bf16_precision(dtype, precision):
    q, keys = data("clustered", 333, 901, 24, seed=3, dtype=dtype)
    got = knn(q, keys, 4, prune=True, precision=precision)
    ref_i = knn_exact(q, keys, 4)[1]
    assert torch.equal(got.idx, ref_i.reshape(got.idx.shape))


def test_pruning_skips_work_on_clustered_data():
    q, keys = data("clustered", 2000, 6000, 16, seed=1)
    before = P.prune_count()
    (d, i), computed = P.pruned_knn(q, keys, 5)
    assert computed < 0.5 * q.shape[0] * keys.shape[0]
    after = P.prune_count()
    assert after.pairs_computed - before.pairs_computed == computed
    assert torch.equal(i, knn(q, keys, 5, prune=False).idx)


def test_near_identical_keys_go_to_the_dense_path():
    """Keys within fp32's error window of each other (an untrained generator's samples):
    the pruned pass hands such rows to the sweep's float64 screen; same answer."""
    g = torch.Generator().manual_seed(11)
    centre = torch.randn(1, 48, generator=g)
    keys = centre + 1e-4 * torch.randn(3000, 48, generator=g)
    q = centre + 1e-4 * torch.randn(40, 48, generator=g)
    before = P.prune_count().pairs_computed
    (d, i), computed = P.pruned_knn(q, keys, 3)
    ref = knn(q, keys, 3, prune=False)
    assert torch.equal(i, ref.idx) and torch.equal(d, ref.dist)
    assert computed >= q.shape[0] * keys.shape[0]       # the deferred rows swept every key
    assert P.prune_count().pairs_computed - before == computed


def test_one_index_serves_several_query_sets():
    q, keys = data("clustered", 600, 2500, 14, seed=12)
    index = P.key_index(keys)
    for part in q.split(250):
        (d, i), _ = P.pruned_knn(part, keys, 4, index=index)
        ref = knn(part, keys, 4, prune=False)
        assert torch.equal(i, ref.idx) and torch.equal(d, ref.dist)


def test_bound_skips_what_cannot_improve():
    q, keys = data("clustered", 300, 2000, 12, seed=4)
    full = knn(q, keys, 2, prune=False)
    # a generous bound (the true 2nd distance, rounded up) changes nothing
    (d, i), _ = P.pruned_knn(q, keys, 2, bound=full.dist[:, 1] * 1.001)
    assert torch.equal(i, full.idx) and torch.equal(d, full.dist)
    # keys that are all farther than every bound: nothing is searched, every row is padding
    (d, i), computed = P.pruned_knn(q, keys + 100.0, 2, bound=full.dist[:, 1] * 1.001)
    assert computed == 0 and bool((i == -1).all()) and bool(torch.isinf(d).all())


def test_gradients_match_the_sweep():
    q, keys = data("clustered", 200, 700, 9, seed=5)
    grads = []
    for prune in (True, False):
        qq, kk = q.clone().requires_grad_(), keys.clone().requires_grad_()
        knn(qq, kk, 3, prune=prune).dist.sum().backward()
        grads.append((qq.grad, kk.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


def test_the_automatic_choice_prunes_many_queries_on_structured_data(monkeypatch):
    """structure_ratio separates noise from clusters; knn(prune=None) prunes clustered
    data with N >= M / 8 queries, and sweeps noise, few queries and small problems."""
    from fastgen.ops import knn_plan
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(4096, 128, generator=g), torch.randn(4096, 128, generator=g)
    assert P.structure_ratio(*noise) > 0.75
    q, keys = data("clustered", 4096, 4096, 128, seed=6)
    assert P.structure_ratio(q, keys) < 0.3
    assert knn_plan.plan_knn(q, keys, 1).prune
    assert not knn_plan.plan_knn(*noise, 1).prune
    assert not knn_plan.plan_knn(q[:500], keys, 1).prune             # N < M / 8
    # noise in few dimensions has a small raw ratio; relative to i.i.d. data it is noise
    low = torch.randn(8192, 8, generator=g), torch.randn(8192, 8, generator=g)
    assert P.structure_ratio(*low) < 0.4 and knn_plan.relative_structure(*low) > 0.75
    assert not knn_plan.plan_knn(*low, 1).prune
    # ... except in very few dimensions, where even uniform noise has near neighbours
    u = torch.rand(8192, 3, generator=g), torch.rand(16384, 3, generator=g)
    assert P.structure_ratio(*u) < 0.1 < 0.75 < knn_plan.relative_structure(*u) and knn_plan.plan_knn(*u, 1).prune
    lq, lk = data("clustered", 8192, 8192, 8, seed=6)
    assert knn_plan.relative_structure(lq, lk) < 0.5 and knn_plan.plan_knn(lq, lk, 1).prune
    assert not knn_plan.plan_knn(q, keys, 1, prune=False).prune
    assert torch.equal(knn(q, keys, 3).idx, knn(q, keys, 3, prune=False).idx)
    small = data("clustered", 300, 1000, 16, seed=6)
    calls = []
    monkeypatch.setattr(knn_plan, "structure_ratio", lambda *a, **kw: calls.append(1))
    assert not knn_plan.plan_knn(*small, 1).prune and calls == []    # no sample for a small problem
    assert not knn_plan.plan_knn(q, keys, 1, streamed=True).prune and calls == []   # streams: only when asked
    s = StreamingKNN(q, 1)
    s.add(keys)
    assert not s.plan.prune and calls == []


def test_streaming_with_pruning_equals_one_knn():
    q, keys = data("clustered", 500, 4000, 16, seed=7)
    s = StreamingKNN(q, 3, prune=True)
    for c in keys.split(700):
        s.add(c)
    d, i = s.result()
    ref = knn(q, keys, 3, prune=False)
    assert torch.equal(i, ref.idx)
    torch.testing.assert_close(d, ref.dist)


def test_streaming_chunk_with_nothing_better_is_cheap():
    q, keys = data("clustered", 500, 3000, 16, seed=8)
    s = StreamingKNN(q, 1, prune=True)
    s.add(keys)
    far = keys + 100.0                       # a chunk every key of which is worse
    (_, _), alone = P.pruned_knn(q, far, 1)
    before = P.prune_count().pairs_computed
    s.add(far)
    assert P.prune_count().pairs_computed - before < 0.2 * alone
    assert torch.equal(s.result().idx, knn(q, keys, 1, prune=False).idx)


def test_bad_prune_arguments():
    q, keys = data("clustered", 10, 20, 4, seed=0)
    with pytest.raises(TypeError, match="prune"):
        knn(q, keys, 1, prune="yes")
    with pytest.raises(ValueError, match="prune=True"):
        knn(q[None], keys[None], 1, prune=True)
    with pytest.raises(ValueError, match="prune=True"):
        knn(q, keys, 1, prune=True, backend="torch")
    bad = q.clone()
    bad[3, 1] = math.nan
    with pytest.raises(ValueError, match="queries"):
        knn(bad, keys, 1, prune=True)


def test_fewer_queries_than_the_sample_on_a_large_problem():
    """structure_ratio samples 64 queries: with fewer it must still measure, not crash."""
    q, keys = data("clustered", 10, 200000, 16, seed=9)
    assert P.structure_ratio(q, keys) < 0.6
    q, keys = data("clustered", 40, 100, 16, seed=9)
    assert P.structure_ratio(q, keys) < 0.6
    assert torch.equal(knn(q, keys, 3).idx, knn(q, keys, 3, prune=False).idx)


def test_gradient_path_keeps_the_exact_distances():
    q, keys = data("clustered", 300, 900, 10, seed=10)
    qq = q.clone().requires_grad_()
    got = knn(qq, keys, 4, prune=True)
    assert torch.equal(got.dist.detach(), knn(q, keys, 4, prune=False).dist)
    got.dist.sum().backward()
    assert qq.grad is not None and bool(torch.isfinite(qq.grad).all())


def test_streaming_prune_true_needs_the_cpp_backend():
    from fastgen.ops import StreamingKNN
    with pytest.raises(ValueError, match="prune=True needs the cpp backend"):
        StreamingKNN(torch.rand(5, 3), 1, backend="torch", prune=True)


@pytest.mark.parametrize("scale", [1e-30, 1e-25, 1e-21, 1e-20, 1e-12, 1.0, 1e12, 1e17])
def test_any_scale_gives_the_sweeps_answer(scale):
    """fp32 bounds underflow (tiny data) or overflow (huge data) unless the search moves
    the data to unit scale: before, 1e-25 data returned idx -1 / dist inf in every row."""
    q, keys = data("clustered", 300, 900, 11, seed=3)
    q, keys = q * scale, keys * scale
    sweep = knn(q, keys, 3, prune=False)
    got = knn(q, keys, 3, prune=True)
    assert (got.idx >= 0).all()
    assert torch.equal(got.idx, sweep.idx)
    assert torch.equal(got.dist, sweep.dist)
    stream = StreamingKNN(q, 3, prune=True)
    for chunk in keys.split(400):
        stream.add(chunk)
    assert torch.equal(stream.result().idx, sweep.idx)


def test_data_too_large_for_fp32_distances_is_refused_on_every_path():
    q, keys = data("clustered", 100, 300, 5, seed=4)
    q, keys = q * 1e30, keys * 1e30
    for prune in (False, True):
        with pytest.raises(ValueError, match="too large for float32"):
            knn(q, keys, 2, prune=prune)


def test_scale_that_would_round_coordinates_falls_back_to_the_sweep():
    """Large data with a coordinate that would become subnormal at unit scale: not rescaled."""
    q, keys = data("clustered", 100, 300, 5, seed=4)
    q, keys = q * 1e17, keys * 1e17
    keys[7, 0] = 1e-30
    assert P.unit_scale(q, keys) is None
    assert torch.equal(knn(q, keys, 2, prune=True).idx, knn(q, keys, 2, prune=False).idx)
