"""fastgen.ops.ball_count (points in balls, nearest centre) against the float64 ground
truth, on every backend, with radii placed exactly on boundaries where the fast
distance is wrong -- the error window is what gets those right."""
import pytest
import torch

from fastgen.ops import ball_count, reference
from conftest import DTYPES, backends
from helpers import assert_close, assert_equal_idx


def boundary_problem(n, m, d, dtype, offset=0.0, scale=1.0):
    """Points and centres, with ball j passing exactly through point j % n (its radius is
    fl32 of the float64 distance), and a copy of each radius one float32 step smaller
    (point j % n just outside): the pairs where an fp32 distance decides wrongly."""
    p = (torch.randn(n, d) * scale + offset).to(dtype)
    c = (torch.randn(m, d) * scale + offset).to(dtype)
    d64 = reference.sqdist_exact(p, c)
    j = torch.arange(m)
    on = d64[j % n, j].float()
    below = torch.nextafter(on, torch.zeros_like(on))
    return p, c, on, below


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1), (37, 5, 3), (300, 129, 64), (70, 45, 517)])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_matches_float64_reference(backend, dtype, tol, shape, precision):
    n, m, d = shape
    if backend == "triton":
        n, m = min(n, 40), min(m, 33)
    p, c, on, below = boundary_problem(n, m, d, dtype, offset=3.0)
    if precision == "bf16" and backend != "cpp":
        with pytest.raises(ValueError, match="runs on the cpp backend only"):
            ball_count(p, c, on, backend=backend, precision=precision)
        return
    # typical radii (k-th neighbour of the centres), and the two boundary sets
    typical = reference.sqdist_exact(c, c).float().kthvalue(min(m, 3), 1).values
    for radii in (typical, on, below):
        got = ball_count(p, c, radii, backend=backend, precision=precision)
        want_c, want_d, want_i = reference.ball_count_exact(p, c, radii)
        assert got.count.dtype == torch.long and got.count.shape == (n,)
        assert_equal_idx(got.count, want_c)
        assert_close(got.dist, want_d, tol, tol)
        assert_equal_idx(got.idx, want_i)   # (Triton's nearest is knn's, exact for k = 1)
    # the two boundary sets differ by the pairs whose float32 distance is exactly on[j] > 0
    # (a point equal to its centre -- likely in bf16 -- has on = below = 0: no difference):
    # at least the one point each ball was built through (the test is not vacuous)
    got_on = ball_count(p, c, on, backend=backend, precision=precision).count
    got_below = ball_count(p, c, below, backend=backend, precision=precision).count
    on_boundary = int(((reference.sqdist_exact(p, c).float() == on[None]) & (on[None] > 0)).sum())
    assert int(got_on.sum() - got_below.sum()) == on_boundary >= m - int((on == 0).sum())


def test_far_from_origin_and_large_d():
    # cancellation-heavy: data at 1e3 from the origin, D = 2048 (the Inception size)
    p, c, on, below = boundary_problem(150, 90, 2048, torch.float32, offset=1e3)
    for radii in (on, below):
        got = ball_count(p, c, radii)
        assert_equal_idx(got.count, reference.ball_count_exact(p, c, radii)[0])


@pytest.mark.skipif("triton" not in backends(), reason="needs triton (interpreter or GPU)")
def test_triton_window_is_what_decides_the_boundary(monkeypatch):
    """A mutant with no error window must count the boundary balls wrongly on this data
    (so the test above can fail), and the real window must flag them as unsure."""
    from fastgen.ops.triton import ball_count as tb
    p, c, on, _ = boundary_problem(40, 33, 300, torch.float32, offset=50.0)
    want = reference.ball_count_exact(p, c, on)[0]
    sure, unsure = tb.ball_count_triton(p, c, on)
    assert int(unsure.sum()) >= 33 and bool((sure.long() <= want).all())
    monkeypatch.setattr(tb, "error_coef", lambda dim: (0.0, 0.0))
    mutant, _ = tb.ball_count_triton(p, c, on)
    assert not torch.equal(mutant.long(), want)
    assert not torch.equal(ball_count(p, c, on, backend="triton").count, want)


def test_empty_points_and_duplicates():
    c = torch.randn(6, 4)
    out = ball_count(torch.empty(0, 4), c, torch.ones(6))
    assert out.count.shape == (0,) and out.idx.shape == (0,)
    # every centre twice, radius 0: each point equal to a centre is in both copies
    cc = torch.cat([c, c])
    out = ball_count(c, cc, torch.zeros(12))
    assert out.count.tolist() == [2] * 6 and out.idx.tolist() == list(range(6))   # ties: lowest index


def test_opcheck():
    p, c = torch.randn(20, 7), torch.randn(11, 7)
    r = torch.rand(11) * 10
    torch.library.opcheck(torch.ops.fastgen.ball_count.default, (p, c, r, "fp32"))
    torch.library.opcheck(torch.ops.fastgen.ball_count.default, (p, c, r, "bf16"))


@pytest.mark.parametrize("call,exc,msg", [
    (lambda: ball_count(torch.randn(5, 3), torch.randn(4, 2), torch.ones(4)), ValueError, "D=3"),
    (lambda: ball_count(torch.randn(5, 3), torch.randn(0, 3), torch.ones(0)), ValueError, "centres is empty"),
    (lambda: ball_count(torch.randn(2, 5, 3), torch.randn(4, 3), torch.ones(4)), ValueError, "points must be 2-D"),
    (lambda: ball_count(torch.randn(5, 3), torch.randn(4, 3).half(), torch.ones(4)), TypeError, "centres is torch.float16"),
    (lambda: ball_count(torch.randn(5, 3), torch.randn(4, 3), torch.ones(3)), ValueError, "radii must be a 1-D tensor of M=4"),
    (lambda: ball_count(torch.randn(5, 3), torch.randn(4, 3), torch.ones(4, dtype=torch.long)), TypeError, "radii must be a float"),
    (lambda: ball_count(torch.randn(5, 3), torch.randn(4, 3), [1.0] * 4), TypeError, "radii must be a torch.Tensor"),
    (lambda: ball_count(torch.randn(5, 3), torch.randn(4, 3), torch.tensor([1.0, -1, 1, 1])), ValueError, "radii must be finite and >= 0"),
    (lambda: ball_count(torch.randn(5, 3), torch.randn(4, 3), torch.tensor([1.0, float("nan"), 1, 1])), ValueError, "radii must be finite"),
    (lambda: ball_count(torch.full((5, 3), float("nan")), torch.randn(4, 3), torch.ones(4)), ValueError, "points contains NaN"),
    (lambda: ball_count(torch.randn(5, 3), torch.tensor([[1e30, 0, 0]] + [[0.0] * 3] * 3), torch.ones(4)), ValueError,
     "centres has values too large"),
    (lambda: ball_count(torch.randn(5, 3), torch.randn(4, 3), torch.ones(4), precision="fp8"), ValueError, "precision"),
    (lambda: ball_count(torch.randn(5, 3), torch.randn(4, 3), torch.ones(4), backend="cuda"), ValueError, "backend"),
])
def test_bad_inputs(call, exc, msg):
    with pytest.raises(exc, match=msg):
        call()


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_bad_radii_on_every_backend(backend, bad):
    r = torch.ones(4)
    r[2] = bad
    with pytest.raises(ValueError, match="radii must be finite and >= 0"):
        ball_count(torch.randn(5, 3), torch.randn(4, 3), r, backend=backend)
