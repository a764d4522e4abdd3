"""fastgen.ops.StreamingKNN: chunks of keys merged into one exact answer, equal to one
knn over all the keys (float64 ranking, lowest global index on ties)."""
import pytest
import torch

from fastgen.ops import StreamingKNN, knn, reference
from helpers import assert_equal_idx


def chunks(keys, sizes):
    out, s = [], 0
    for n in sizes:
        out.append(keys[s:s + n])
        s += n
    out.append(keys[s:])
    return out


@pytest.mark.parametrize("k", [1, 3, 7])
@pytest.mark.parametrize("sizes", [[], [1], [5, 0, 17], [40, 40, 40], [3] * 30])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_equals_one_knn_over_all_keys(k, sizes, dtype):
    q = torch.randn(37, 9).to(dtype)
    keys = torch.randn(150, 9).to(dtype)
    s = StreamingKNN(q, k)
    for c in chunks(keys, sizes):
        s.add(c)
    dist, idx = s.result()
    ref_d, ref_i = reference.knn_exact(q, keys, k)
    assert_equal_idx(idx, ref_i)
    assert torch.allclose(dist.double(), ref_d, rtol=1e-6, atol=1e-6)
    one = knn(q, keys, k)
    assert_equal_idx(idx, one.idx)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_duplicates_across_chunks_go_to_the_lowest_global_index(precision):
    base = torch.randint(-3, 4, (20, 6)).float()
    keys = torch.cat([base, base, base])              # key j, j + 20, j + 40 are equal
    q = base[torch.randint(0, 20, (50,))]
    s = StreamingKNN(q, 2, precision=precision)
    for c in (keys[:20], keys[20:45], keys[45:]):
        s.add(c)
    dist, idx = s.result()
    ref_d, ref_i = reference.knn_exact(q, keys, 2)
    assert_equal_idx(idx, ref_i)
    assert (idx[:, 0] < 20).all() and (dist[:, 0] == 0).all()


def test_far_from_origin_and_near_ties():
    keys = torch.randn(300, 16) + 1000
    q = keys[torch.randint(0, 300, (64,))] + 1e-3 * torch.randn(64, 16)
    s = StreamingKNN(q, 4)
    for c in keys.split(41):
        s.add(c)
    _, idx = s.result()
    assert_equal_idx(idx, reference.knn_exact(q, keys, 4)[1])


@pytest.mark.parametrize("call, exc, msg", [
    (lambda: StreamingKNN(torch.randn(5, 3), 0), ValueError, "k must be"),
    (lambda: StreamingKNN(torch.randn(2, 5, 3)), ValueError, "queries must be 2-D"),
    (lambda: StreamingKNN(torch.full((5, 3), float("nan"))), ValueError, "queries contains NaN"),
    (lambda: StreamingKNN(torch.randn(5, 3)).add(torch.randn(4, 2)), ValueError, "D=2"),
    (lambda: StreamingKNN(torch.randn(5, 3)).add(torch.randn(4, 3).half()), TypeError, "keys is torch.float16"),
    (lambda: StreamingKNN(torch.randn(5, 3)).add(torch.full((4, 3), float("inf"))), ValueError, "keys contains"),
    (lambda: StreamingKNN(torch.randn(5, 3), 3).add(torch.randn(2, 3)).result(), ValueError, "only 2 keys"),
])
def test_bad_inputs(call, exc, msg):
    with pytest.raises(exc, match=msg):
        call()


@pytest.mark.parametrize("edit", ["add_", "numpy", "data"])
def test_queries_edited_between_adds_do_not_change_the_answer(edit):
    """The queries were kept by reference: `q.add_(5)` between two add() calls searched the
    second chunk for other queries (hostile review: 50 of 50 rows matched neither set).
    StreamingKNN owns a copy: the answer is that of the queries it was given."""
    torch.manual_seed(0)
    q, keys = torch.randn(50, 6), torch.randn(90, 6)
    ref_d, ref_i = reference.knn_exact(q.clone(), keys, 3)
    s = StreamingKNN(q, 3)
    s.add(keys[:40])
    if edit == "add_":
        q.add_(5)
    elif edit == "numpy":
        q.numpy()[:] = 9.0
    else:
        q.data = torch.randn(50, 6)
    s.add(keys[40:])
    got = s.result()
    assert_equal_idx(got.idx, ref_i)
    assert torch.allclose(got.dist.double(), ref_d, rtol=1e-5, atol=1e-5)
    assert s.queries.data_ptr() != q.data_ptr()
