"""fastgen.ops.knn on every backend against the float64 ground truth (reference.knn_exact).

The cpp backend is exact by construction (certified candidates re-ranked in float64),
so its indices must equal the ground truth's everywhere, in both precisions; so must
triton's for k <= 128 (an fp32 or bf16 screen re-ranked in float64, fastgen/ops/certified.py).
The torch backend (and triton above k = 128) ranks in fp32, so it is held to the
distances rank by rank and to exact indices only where the arithmetic is exact.
"""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import fastgen
from fastgen.ops import baselines, knn, reference
from fastgen.ops.knn import SCREEN_MAX_K
from conftest import DTYPES, backends
from helpers import assert_close, assert_equal_idx, assert_knn_equivalent

SHAPES = [(1, 1, 1), (7, 5, 3), (123, 77, 17), (130, 600, 33), (257, 1030, 64)]
SMALL_SHAPES = [(1, 1, 1), (7, 5, 3), (33, 70, 17)]  # for the Triton interpreter


def shapes_for(backend):
    return SMALL_SHAPES if backend == "triton" else SHAPES


def check(q, k, kk, backend, precision="fp32", exclude_self=False):
    dist, idx = knn(q, k, kk, exclude_self=exclude_self, backend=backend, precision=precision)
    ref_d, ref_i = reference.knn_exact(q, k, kk, exclude_self=exclude_self)
    assert dist.dtype == torch.float32 and idx.dtype == torch.long
    if backend == "cpp" or (backend == "triton" and kk <= SCREEN_MAX_K):
        assert_equal_idx(idx, ref_i)
        assert_close(dist, ref_d, rtol=1e-6, atol=1e-6)
    else:
        assert_knn_equivalent(q, k, dist, idx, ref_d, rtol=1e-4)
    return dist, idx


@pytest.mark.parametrize("backend,shape", [(b, s) for b in backends() for s in shapes_for(b)])
@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("kk", [1, 4])
def test_matches_float64_reference(backend, shape, dtype, tol, kk):
    n, m, d = shape
    kk = min(kk, m)
    q = torch.randn(n, d).to(dtype)
    k = torch.randn(m, d).to(dtype)
    check(q, k, kk, backend)


TRITON = pytest.mark.skipif("triton" not in backends(), reason="needs triton (interpreter or GPU)")


@TRITON
def test_triton_above_the_screens_k_ranks_in_fp32():
    # k > SCREEN_MAX_K takes the plain fp32 kernel: held to the distances rank by rank
    q, k = torch.randn(9, 6), torch.randn(140, 6) * 2
    check(q, k, SCREEN_MAX_K + 3, "triton")


@TRITON
@pytest.mark.parametrize("shape", SMALL_SHAPES)
@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("kk", [1, 4])
@pytest.mark.parametrize("exclude_self", [False, True])
def test_plain_triton_kernel(shape, dtype, tol, kk, exclude_self):
    """The fp32-ranking Triton kernel itself (knn above SCREEN_MAX_K) on every small shape."""
    from fastgen.ops.triton.knn import knn_triton
    n, m, d = shape
    if exclude_self:
        n = m = max(n, 2)
    kk = min(kk, m - exclude_self)
    q = torch.randn(n, d).to(dtype)
    k = q if exclude_self else torch.randn(m, d).to(dtype)
    dist, idx = knn_triton(q[None], k[None], kk, exclude_self)
    ref_d, _ = reference.knn_exact(q, k, kk, exclude_self=exclude_self)
    assert_knn_equivalent(q, k, dist[0], idx[0], ref_d, rtol=max(tol, 1e-4))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("kk", [1, 10, 64])
def test_cpp_exact_both_precisions(precision, kk):
    q = torch.randn(300, 48)
    k = torch.randn(700, 48)
    check(q, k, kk, "cpp", precision)


@pytest.mark.parametrize("backend", backends())
def test_far_from_origin(backend):
    # +1000 on every coordinate: the expansion cancels badly unless the op guards it
    n, m, d = (40, 60, 9) if backend == "triton" else (200, 500, 32)
    q = torch.randn(n, d) + 1000
    k = torch.randn(m, d) + 1000
    dist, idx = check(q, k, 3, backend)
    assert (dist >= 0).all()


@pytest.mark.parametrize("backend", backends())
def test_self_distance_is_zero(backend):
    x = torch.randn(50, 13) * 100 + 1000
    dist, idx = knn(x, x, 1, backend=backend)
    assert_equal_idx(idx[:, 0], torch.arange(50))
    assert (dist == 0).all(), f"self-distances {dist[dist != 0][:5]}"


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("exclude_self", [False, True])
def test_exact_ties_go_to_lowest_index(backend, exclude_self):
    # small integers: every product and sum is exact in fp32, so ties are real ties
    x = torch.randint(0, 3, (45, 3)).float()
    q = x if exclude_self else torch.randint(0, 3, (30, 3)).float()
    dist, idx = knn(q, x, 6, exclude_self=exclude_self, backend=backend)
    ref_d, ref_i = reference.knn_exact(q, x, 6, exclude_self=exclude_self)
    assert_equal_idx(idx, ref_i)
    assert_close(dist, ref_d, 0, 0)


@pytest.mark.parametrize("backend", backends())
def test_exclude_self_is_by_index_not_distance(backend):
    x = torch.randn(20, 5)
    x = torch.cat([x, x[:3]])  # rows 20..22 duplicate rows 0..2
    dist, idx = knn(x, x, 1, exclude_self=True, backend=backend)
    assert_equal_idx(idx[:3, 0], torch.tensor([20, 21, 22]))
    assert (dist[:3] == 0).all()
    assert (idx[:, 0] != torch.arange(23)).all()


@pytest.mark.parametrize("backend", backends())
def test_batched_equals_per_batch(backend):
    n, m, d = (9, 21, 5) if backend == "triton" else (70, 150, 12)
    q = torch.randn(3, n, d)
    k = torch.randn(3, m, d)
    dist, idx = knn(q, k, 4, backend=backend)
    assert dist.shape == (3, n, 4)
    for b in range(3):
        d_b, i_b = knn(q[b], k[b], 4, backend=backend)
        assert_equal_idx(idx[b], i_b)
        assert_close(dist[b], d_b, 0, 0)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cpp_certified_on_near_ties(precision):
    # keys on a sphere around the query whose radii differ by ~1e-6 relative: below
    # bf16 resolution (and near fp32's), so only the certified re-rank gets them right
    torch.manual_seed(torch.initial_seed() % 1000)
    n, m, d = 16, 600, 40
    q = torch.randn(n, d) * 3 + 50
    dirs = torch.nn.functional.normalize(torch.randn(n, m, d), dim=-1)
    radii = 5 + 1e-5 * torch.rand(n, m)
    keys = q[:, None, :] + radii[..., None] * dirs  # (n, m, d): one key set per query
    check(q[:, None, :], keys, 5, "cpp", precision)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cpp_duplicates_and_large_norms(precision):
    base = torch.randn(40, 24) * 1e3 + 1e4
    k = base[torch.randint(0, 40, (500,))]  # many exact duplicates
    q = base[torch.randint(0, 40, (100,))] + 1e-2 * torch.randn(100, 24)
    check(q, k, 7, "cpp", precision)


def test_cpp_full_scan_fallback_when_everything_ties():
    # 9000 identical keys: more than the candidate cap, so rows take the exact full scan
    before = fastgen._ext.build_info()["overflow_rows"]
    q = torch.zeros(3, 2)
    k = torch.zeros(9000, 2)
    dist, idx = knn(q, k, 4)
    assert_equal_idx(idx, torch.arange(4).expand(3, 4))
    assert (dist == 0).all()
    assert fastgen._ext.build_info()["overflow_rows"] == before + 3


def dense_rows():
    return fastgen._ext.build_info()["dense_rows"]


def scan_rows():
    return fastgen._ext.build_info()["scan_rows"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("kk,exclude_self", [(1, False), (6, False), (3, True)])
def test_cpp_near_identical_keys_take_the_float64_screen(precision, kk, exclude_self):
    # an untrained generator's samples: every key sits inside the best one's fp32 error
    # window, so the rows are screened again by float64 GEMMs and re-ranked exactly; odd
    # sizes (with exclude_self: three points repeated, each row a third of the keys at
    # distance 0)
    torch.manual_seed(11)
    base = torch.rand(1, 203)
    k = base + 1e-5 * torch.randn(1201, 203)
    if exclude_self:
        k = k[torch.arange(1201) % 3]
    q = k.clone() if exclude_self else base + torch.rand(45, 203)
    before = dense_rows()
    check(q, k, kk, "cpp", precision, exclude_self=exclude_self)
    assert dense_rows() > before


def test_cpp_few_keys_in_the_window_stay_on_the_pairwise_path():
    # k * 4 > M: every key is inside a row's window, but a handful of keys is cheaper pair
    # by pair than through the dense path
    torch.manual_seed(12)
    before = dense_rows()
    check(torch.randn(5000, 8), torch.randn(10, 8), 3, "cpp")
    assert dense_rows() == before


def test_cpp_blocked_scan_keeps_ties_to_the_lowest_index():
    # 10,000 exact copies of each of three points: past the float64 screen's cap, the
    # blocked scan answers, listing equal distances by index; odd dim (a % 8 tail)
    torch.manual_seed(13)
    pts = torch.randn(3, 37)
    k = pts[torch.arange(30000) % 3] + 0.0
    q = pts[[2, 0, 1]] + 1e-3 * torch.randn(3, 37)
    before = scan_rows()
    dist, idx = check(q, k, 9, "cpp")
    assert scan_rows() - before == 3
    assert (idx[0] % 3 == 2).all() and (idx[0].diff() > 0).all()


def test_cpp_dense_rows_over_several_key_chunks_and_crowded_rows():
    # 1,500 deferred rows of dim 4 split the float64 screen's keys into chunks of ~2,800;
    # rows 0-2 see 10,000 exact copies of their nearest key: past the float64 screen's
    # candidate cap, the blocked scan answers them (ties listed by index)
    torch.manual_seed(5)
    base = torch.randn(1, 4)
    k = base + 1e-7 * torch.randn(30000, 4)
    k[::3] = k[0]
    q = base + 0.3 * torch.randn(1500, 4)
    q[:3] = k[0] + 1e-9
    before, scanned = dense_rows(), scan_rows()
    dist, idx = check(q, k, 2, "cpp")
    assert dense_rows() - before >= 1000
    assert scan_rows() - scanned >= 3
    assert (idx[:3] == torch.tensor([0, 3])).all()


def test_cpp_dense_rows_in_several_row_blocks():
    # 5,000 rows of a fresh codebook (every code in every row's fp32 window): the float64
    # screen takes them 2,048 rows at a time
    torch.manual_seed(6)
    codes = 1e-7 * torch.randn(700, 16)
    x = torch.randn(5000, 16)
    before = dense_rows()
    check(x, codes, 2, "cpp")
    assert dense_rows() - before == 5000


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 300), m=st.integers(1, 1100), d=st.integers(1, 70),
       kk=st.integers(1, 20), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       precision=st.sampled_from(["fp32", "bf16"]), seed=st.integers(0, 2**31 - 1))
def test_cpp_property_exact_across_tile_boundaries(n, m, d, kk, dtype, precision, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, d, generator=g).to(dtype)
    k = torch.randn(m, d, generator=g).to(dtype)
    check(q, k, min(kk, m), "cpp", precision)


@pytest.mark.parametrize("backend", backends())
def test_gradients_match_float64(backend):
    q = torch.randn(15, 6, requires_grad=True)
    k = torch.randn(25, 6, requires_grad=True)
    w = torch.randn(15, 3)
    dist, idx = knn(q, k, 3, backend=backend)
    gq, gk = torch.autograd.grad((dist * w).sum(), [q, k])
    q64 = q.detach().double().requires_grad_()
    k64 = k.detach().double().requires_grad_()
    d64 = baselines.gather_sqdist(q64[None], k64[None], idx[None])[0].double()
    rq, rk = torch.autograd.grad((d64 * w.double()).sum(), [q64, k64])
    assert_close(gq, rq, 1e-5, 1e-5)
    assert_close(gk, rk, 1e-5, 1e-5)


def test_opcheck_knn():
    q = torch.randn(2, 11, 5)
    k = torch.randn(2, 17, 5, requires_grad=True)
    for args in [(q, k, 3, False, "fp32"), (q.requires_grad_(), k, 1, False, "bf16")]:
        torch.library.opcheck(torch.ops.fastgen.knn.default, args)
    x = torch.randn(2, 9, 4)
    torch.library.opcheck(torch.ops.fastgen.knn.default, (x, x, 2, True, "fp32"))


def test_torch_compile_calls_the_op():
    @torch.compile(fullgraph=True)
    def nearest(q, k):
        dist, idx = torch.ops.fastgen.knn(q, k, 2, False, "fp32")
        return dist.sum(-1), idx

    q = torch.randn(1, 40, 8)
    k = torch.randn(1, 90, 8)
    s, idx = nearest(q, k)
    ref_d, ref_i = reference.knn_exact(q, k, 2)
    assert_equal_idx(idx, ref_i)
    assert_close(s, ref_d.sum(-1), 1e-5, 1e-5)


def test_integer_types_for_k():
    # k from numpy (an array's int64) or a 0-d integer tensor works like a Python int
    np = pytest.importorskip("numpy")
    q, k = torch.randn(7, 3), torch.randn(9, 3)
    want = knn(q, k, 2)
    for kk in (np.int64(2), np.int32(2), torch.tensor(2)):
        got = knn(q, k, kk)
        assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


def test_empty_queries_give_empty_results():
    dist, idx = knn(torch.randn(0, 4), torch.randn(5, 4), 2)
    assert dist.shape == (0, 2) and idx.shape == (0, 2)


BAD_INPUTS = [
    (lambda: knn(torch.randn(5, 3), torch.randn(6, 4)), ValueError, "D=3"),
    (lambda: knn(torch.randn(5, 3), torch.randn(6, 3), 7), ValueError, "k must be in"),
    (lambda: knn(torch.randn(5, 3), torch.randn(6, 3), 0), ValueError, "k must be in"),
    (lambda: knn(torch.randn(5, 3), torch.randn(6, 3), 2.0), TypeError, "k must be an int"),
    (lambda: knn(torch.randn(5, 3), torch.randn(6, 3), True), TypeError, "k must be an int"),
    (lambda: knn(torch.randn(5, 3), torch.randn(6, 3), torch.tensor(2.0)), TypeError, "k must be an int"),
    (lambda: knn(torch.randn(5, 3), torch.randn(6, 3), torch.tensor([2])), TypeError, "k must be an int"),
    (lambda: knn(torch.randn(5, 3), torch.randn(0, 3)), ValueError, "k must be in"),
    (lambda: knn(torch.randn(5, 3), torch.randn(5, 3).double()), TypeError, "float32, float16 or bfloat16"),
    (lambda: knn(torch.randn(5, 3), torch.randn(5, 3).half()), TypeError, "keys is torch.float16"),
    (lambda: knn(torch.randn(5), torch.randn(5, 3)), ValueError, "queries must be"),
    (lambda: knn(torch.randn(2, 5, 3), torch.randn(3, 5, 3)), ValueError, "batch size"),
    (lambda: knn(torch.randn(5, 3), torch.randn(2, 5, 3)), ValueError, "both must be"),
    (lambda: knn(torch.tensor([[float("nan"), 0.0]]), torch.randn(5, 2)), ValueError, "queries contains NaN"),
    (lambda: knn(torch.randn(3, 2), torch.tensor([[float("inf"), 0.0]])), ValueError, "keys contains NaN"),
    (lambda: knn(torch.full((3, 2), 1e30), torch.randn(5, 2)), ValueError, "too large"),
    (lambda: knn(torch.tensor([[1.5e19]]), torch.tensor([[-1.5e19]])), ValueError, "too large"),
    (lambda: knn(torch.randn(5, 3, device="meta"), torch.randn(6, 3, device="meta")), ValueError, "CPU or CUDA"),
    (lambda: knn(torch.randn(5, 3), torch.randn(6, 3), exclude_self=True), ValueError, "exclude_self"),
    (lambda: knn(torch.randn(5, 3), torch.randn(6, 3), backend="gpu"), ValueError, "backend must be"),
    (lambda: knn(torch.randn(5, 3), torch.randn(6, 3), precision="fp8"), ValueError, "precision must be"),
    (lambda: knn(torch.randn(5, 3), torch.randn(6, 3), backend="torch", precision="bf16"), ValueError,
     "runs on the cpp and triton backends only"),
    (lambda: knn(torch.randn(5, 0), torch.randn(6, 0)), ValueError, "zero features"),
    (lambda: knn([[1.0]], torch.randn(6, 1)), TypeError, "queries must be a torch.Tensor"),
]


@pytest.mark.parametrize("call,exc,msg", BAD_INPUTS)
def test_bad_inputs_raise_clear_errors(call, exc, msg):
    with pytest.raises(exc, match=msg):
        call()


@pytest.mark.parametrize("args,msg", [
    ((torch.randn(5, 3), torch.randn(1, 6, 3), 1, False, "fp32"), "queries must be a 3-D"),
    ((torch.randn(1, 5, 3), torch.randn(1, 6, 4), 1, False, "fp32"), "D="),
    ((torch.randn(1, 5, 3), torch.randn(1, 6, 3), 9, False, "fp32"), "exceeds"),
    ((torch.randn(1, 5, 3).double(), torch.randn(1, 6, 3).double(), 1, False, "fp32"), "float32"),
    ((torch.full((1, 5, 3), float("nan")), torch.randn(1, 6, 3), 1, False, "fp32"), "NaN"),
    ((torch.randn(1, 5, 3), torch.randn(1, 6, 3), 1, False, "int8"), "precision"),
])
def test_raw_op_checks_never_crash(args, msg):
    # the C++ op checks its own arguments too: a direct torch.ops call cannot segfault
    with pytest.raises((RuntimeError, ValueError, TypeError), match=msg):
        torch.ops.fastgen.knn(*args)


def test_raw_op_with_a_meta_input_raises():
    with pytest.raises(ValueError, match="one device"):
        torch.ops.fastgen.knn(torch.randn(1, 5, 3), torch.randn(1, 6, 3, device="meta"), 2, False, "fp32")


def _scale_paths():
    from fastgen.ops import StreamingKNN, nearest_code, patch_nn

    def stream(q, k, kk, **kw):
        s = StreamingKNN(q, kk, **kw)
        for chunk in k.split(170):
            s.add(chunk)
        return s.result().idx

    paths = {
        "knn auto": lambda q, k, kk: knn(q, k, kk).idx,
        "knn prune=True": lambda q, k, kk: knn(q, k, kk, prune=True).idx,
        "knn bf16": lambda q, k, kk: knn(q, k, kk, precision="bf16").idx,
        "StreamingKNN": lambda q, k, kk: stream(q, k, kk),
        "StreamingKNN prune=True": lambda q, k, kk: stream(q, k, kk, prune=True),
    }
    for be in backends():
        paths[f"knn {be}"] = lambda q, k, kk, be=be: knn(q, k, kk, backend=be).idx
        paths[f"nearest_code {be}"] = lambda q, k, kk, be=be: nearest_code(q, k, backend=be).idx[:, None]
        paths[f"patch_nn alpha=None {be}"] = lambda q, k, kk, be=be: patch_nn(q, k, None, backend=be)[:, None]
    return paths


SCALE_PATHS = _scale_paths()


SCALES = [1e-30, 1e-25, 1e-20, 1e-12, 1.0, 1e12, 1e17]


# the Triton interpreter takes seconds a call: its paths run the two ends and the middle
@pytest.mark.parametrize("path,scale", [(p, s) for p in sorted(SCALE_PATHS) for s in SCALES
                                        if "triton" not in p or s in (1e-30, 1.0, 1e17)])
def test_every_path_gives_the_sweeps_answer_at_any_scale(path, scale):
    # fp32 squares of 1e-25 data underflow to 0 (every key ties) and bounds of 1e17 data
    # overflow unless a path moves the data to unit scale; the answer must not depend on it
    torch.manual_seed(7)
    centres = torch.randn(12, 7) * 3
    q = centres[torch.randint(12, (120,))] + torch.randn(120, 7)
    k = centres[torch.randint(12, (400,))] + torch.randn(400, 7)
    q, k = q * scale, k * scale
    kk = 1 if path.startswith(("nearest_code", "patch_nn")) else 3
    sweep = knn(q, k, kk, prune=False, backend="cpp")
    assert torch.equal(sweep.idx, reference.knn_exact(q, k, kk)[1])
    assert torch.equal(SCALE_PATHS[path](q, k, kk), sweep.idx)


@pytest.mark.parametrize("path", sorted(SCALE_PATHS))
def test_every_path_refuses_data_too_large_for_fp32_distances(path):
    q, k = torch.randn(20, 5) * 1e30, torch.randn(60, 5) * 1e30
    with pytest.raises(ValueError, match="too large"):
        SCALE_PATHS[path](q, k, 1)
