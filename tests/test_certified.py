"""The triton backend's exact searches (fastgen/ops/certified.py): precision="bf16" is a
bf16 screen (explicitly rounded inputs; tensor cores on a GPU, the same arithmetic through
an fp32 dot under the interpreter) whose candidates are re-ranked in float64, then an fp32
screen for the rows bf16 cannot settle; precision="fp32" (knn, k <= 128) starts there. Held to what the
CPU's certified mode is held to: the float64 reference's indices, bit for bit, on data
built to defeat bf16 (near-ties far below its resolution) -- and a mutant with no error
window must fail the same data.
"""
import pytest
import torch

from conftest import DTYPES, backends
from fastgen.ops import certified, knn, nearest_code, patch_nn, reference
from helpers import assert_close, assert_equal_idx, image_patches

pytestmark = pytest.mark.skipif("triton" not in backends(), reason="triton cannot run here (no GPU, no TRITON_INTERPRET)")


PRECISIONS = pytest.mark.parametrize("precision", ["fp32", "bf16"])


def check(q, k, kk, exclude_self=False, precision="bf16"):
    dist, idx = knn(q, k, kk, exclude_self=exclude_self, backend="triton", precision=precision)
    ref_d, ref_i = reference.knn_exact(q, k, kk, exclude_self=exclude_self)
    assert dist.dtype == torch.float32 and idx.dtype == torch.long
    assert_equal_idx(idx, ref_i)
    assert_close(dist, ref_d, rtol=1e-6, atol=1e-6)
    return dist, idx


def spy_fallback(monkeypatch):
    """Counts the rows that the fallback sweep answers."""
    rows = []
    real = certified._sweep_rows

    def spy(queries, keys, k, den, exclude_self, redo, out_d, out_i):
        rows.append(int(redo.sum()))
        return real(queries, keys, k, den, exclude_self, redo, out_d, out_i)
    monkeypatch.setattr(certified, "_sweep_rows", spy)
    return rows


@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 5, 3), (33, 70, 17), (20, 130, 40)])
@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("kk", [1, 4, 20])
@PRECISIONS
def test_knn_matches_float64_reference(shape, dtype, tol, kk, precision):
    n, m, d = shape
    q = torch.randn(n, d).to(dtype)
    k = torch.randn(m, d).to(dtype)
    check(q, k, min(kk, m), precision=precision)


@pytest.mark.parametrize("kk", [1, 3])
@PRECISIONS
def test_knn_exclude_self_and_batches(kk, precision):
    x = torch.randn(3, 37, 9)
    check(x, x, kk, exclude_self=True, precision=precision)
    check(torch.randn(2, 11, 6), torch.randn(2, 50, 6), kk, precision=precision)


def sparse_near_ties(n=12, m=300, d=40, near=6, offset=50.0):
    """Per query, `near` keys on a sphere of radius 5 whose radii differ by ~1e-5 relative
    (far below bf16's 2^-8) and the rest at radius 9: few enough candidates that no row
    needs the fallback, so only the window decides."""
    q = torch.randn(n, d) * 3 + offset
    dirs = torch.nn.functional.normalize(torch.randn(n, m, d), dim=-1)
    radii = torch.full((n, m), 9.0)
    radii[:, :near] = 5 + 1e-5 * torch.rand(n, near)
    radii = radii[:, torch.randperm(m)]
    return q[:, None, :], q[:, None, :] + radii[..., None] * dirs


# the data that defeats each precision's screen without its window: bf16's (near-ties
# ~1e-5 relative) is resolved by an fp32 screen, fp32's needs gaps of 1e-6 at 25
HARD = pytest.mark.parametrize("precision,data,kk", [("bf16", "sparse_near_ties", 3), ("fp32", "two_tied", 1)])


@HARD
def test_near_ties_need_the_window(monkeypatch, precision, data, kk):
    q, keys = globals()[data]()
    rows = spy_fallback(monkeypatch)
    check(q, keys, kk, precision=precision)
    assert rows == [], "these rows were meant to be decided by the window, not the fallback"
    # the plain fp32 Triton kernel (k > 128) ranks on the expansion: it gets these wrong,
    # so the data is hard
    from fastgen.ops.triton.knn import knn_triton
    assert not torch.equal(knn_triton(q, keys, kk, False)[1], reference.knn_exact(q, keys, kk)[1])


@HARD
def test_mutant_without_window_fails(monkeypatch, precision, data, kk):
    q, keys = globals()[data]()
    want = reference.knn_exact(q, keys, kk)[1]
    monkeypatch.setattr(certified, "bound", lambda dim, weighted=False, fp32=False: (0.0, 0.0))
    got = knn(q, keys, kk, backend="triton", precision=precision).idx
    assert not torch.equal(got, want)


def test_fp32_precision_is_one_fp32_stage():
    q, keys = sparse_near_ties()
    certified.reset_stats()
    check(q, keys, 3, precision="fp32")
    st = certified.STATS
    assert (st["rows"], st["fp32_rows"], st["swept_rows"]) == (12, 12, 0)
    assert 12 * 3 <= st["candidates"] <= 12 * 6       # the 6 near keys at most, never the far ones


def two_tied(n=48, m=40, d=40):
    """Per query two keys whose squared distances differ by 1e-6 (below what fp32 dots
    resolve at these norms) and 38 more within bf16's window but outside fp32's: the bf16
    screen overflows its 16 slots, the fp32 stage decides -- by its window."""
    q = torch.randn(n, d) * 3
    dirs = torch.nn.functional.normalize(torch.randn(n, m, d), dim=-1)
    sq = 25 + 0.005 + 0.095 * torch.rand(n, m)
    sq[:, 0], sq[:, 1] = 25.0, 25.0 + 1e-6
    sq = torch.gather(sq, 1, torch.stack([torch.randperm(m) for _ in range(n)]))
    return q[:, None, :], q[:, None, :] + sq.sqrt()[..., None] * dirs


def test_fp32_stage_answers_what_bf16_cannot(monkeypatch):
    q, keys = two_tied()
    certified.reset_stats()
    check(q, keys, 1)
    assert {key: certified.STATS[key] for key in ("rows", "fp32_rows", "swept_rows")} == {"rows": 48, "fp32_rows": 48, "swept_rows": 0}


def test_fp32_stage_with_several_rows_per_batch():
    # image patches: many rows of each batch element take the fp32 stage (rows gathered
    # per element), k = 5
    keys = image_patches((20, 26))
    q2 = torch.stack([keys[:60] + 0.05 * torch.randn(60, keys.shape[1]), keys[60:120] + 0.05 * torch.randn(60, keys.shape[1])])
    k2 = torch.stack([keys[:150], keys[100:250]])
    certified.reset_stats()
    check(q2, k2, 5)
    assert certified.STATS["fp32_rows"] >= 10


def test_fp32_stage_mutant_without_window_fails(monkeypatch):
    q, keys = two_tied()
    want = reference.knn_exact(q, keys, 1)[1]
    real = certified.bound
    monkeypatch.setattr(certified, "bound", lambda dim, weighted=False, fp32=False:
                        (0.0, 0.0) if fp32 else real(dim, weighted=weighted))
    assert not torch.equal(knn(q, keys, 1, backend="triton", precision="bf16").idx, want)


def test_window_uses_the_kernels_key_tiles(monkeypatch):
    # the kernel's E takes the largest key norm of each tile of keys; one far key per query
    # makes that E large for its tile. Python must rebuild the same E: a mutant that uses
    # one-column tiles (a smaller E than the kernel subtracted) must fail (found in review)
    def data():
        q, keys = sparse_near_ties(n=12, m=40, near=6, offset=0.0)
        far = q + 100 * torch.nn.functional.normalize(torch.randn_like(q), dim=-1)
        return q, torch.cat([far, keys], 1)
    check(*data(), 3)                      # fresh data
    # the mutant on a fixed draw: on about 1 draw in 8 no row of this data catches it
    torch.manual_seed(1)
    q, keys = data()
    want = reference.knn_exact(q, keys, 3)[1]
    monkeypatch.setattr(certified, "screen_blocks", lambda dim, kc: (32, 1, 16))
    assert not torch.equal(knn(q, keys, 3, backend="triton", precision="bf16").idx, want)


@PRECISIONS
def test_wide_stage_answers_rows_with_tens_of_near_keys(monkeypatch, precision):
    # 40 keys per row inside fp32's window: 16 slots overflow, the 256-slot stage settles
    # them (no sweep); with that stage taken away the same rows are swept
    q, keys = sparse_near_ties(near=40)
    rows = spy_fallback(monkeypatch)
    certified.reset_stats()
    check(q, keys, 3, precision=precision)
    assert rows == [] and certified.STATS["wide_rows"] == 12
    monkeypatch.setattr(certified, "WIDE_SLOTS", certified.slots(3))
    check(q, keys, 3, precision=precision)
    assert rows == [12]


@PRECISIONS
def test_exclude_self_rows_that_overflow_are_rescreened(monkeypatch, precision):
    # clusters of 30 near-identical points: every row's window holds its 29 mates, more
    # than 16 slots; the 256-slot stage (k + 1 with self, self dropped) settles them
    centres = torch.randn(10, 8) * 3
    x = (centres[:, None, :] + 1e-5 * torch.randn(10, 30, 8)).reshape(300, 8)[torch.randperm(300)]
    rows = spy_fallback(monkeypatch)
    certified.reset_stats()
    check(x, x, 3, exclude_self=True, precision=precision)
    assert rows == [] and certified.STATS["wide_rows"] == 300


@PRECISIONS
def test_gradients_leave_the_distances_as_they_were(precision):
    # dist is fl32 of the float64 distance, ascending; asking for gradients must not swap
    # it for an fp32 recomputation (two keys 1e-6 apart would come out of order)
    q, keys = two_tied()
    plain = knn(q, keys, 2, backend="triton", precision=precision).dist
    qg = q.clone().requires_grad_()
    dist = knn(qg, keys, 2, backend="triton", precision=precision).dist
    assert torch.equal(dist.detach(), plain) and bool((dist[..., 1] >= dist[..., 0]).all())
    (g,) = torch.autograd.grad(dist.sum(), [qg])
    assert g.abs().sum() > 0


@PRECISIONS
def test_dense_near_ties_take_the_fallback(monkeypatch, precision):
    # 600 keys inside the window of every row, at bf16 and at fp32: every row is swept
    n, m, d = 8, 600, 40
    q = torch.randn(n, d) * 3 + 50
    dirs = torch.nn.functional.normalize(torch.randn(n, m, d), dim=-1)
    keys = q[:, None, :] + (5 + 1e-5 * torch.rand(n, m))[..., None] * dirs
    rows = spy_fallback(monkeypatch)
    check(q[:, None, :], keys, 5, precision=precision)
    assert rows == [n]


@PRECISIONS
def test_everything_tied_goes_to_lowest_index(monkeypatch, precision):
    rows = spy_fallback(monkeypatch)
    dist, idx = knn(torch.zeros(3, 2), torch.zeros(500, 2), 4, backend="triton", precision=precision)
    assert_equal_idx(idx, torch.arange(4).expand(3, 4))
    assert (dist == 0).all() and rows == [3]


@PRECISIONS
def test_integer_ties_and_far_from_origin(precision):
    x = torch.randint(0, 3, (45, 3)).float()
    check(x, x, 6, exclude_self=True, precision=precision)
    check(torch.randn(30, 9) + 1000, torch.randn(70, 9) + 1000, 3, precision=precision)


@PRECISIONS
def test_nearest_code_and_gradients(precision):
    x = torch.randn(40, 16, requires_grad=True)
    cb = torch.randn(33, 16, requires_grad=True)
    dist, idx = nearest_code(x, cb, backend="triton", precision=precision)
    ref_i, ref_d = reference.nearest_code_exact(x.detach(), cb.detach())
    assert_equal_idx(idx, ref_i)
    gx, gc = torch.autograd.grad(dist.sum(), [x, cb])
    x64, c64 = x.detach().double().requires_grad_(), cb.detach().double().requires_grad_()
    rx, rc = torch.autograd.grad((x64 - c64[idx]).square().sum(), [x64, c64])
    assert_close(gx, rx, 1e-5, 1e-5)
    assert_close(gc, rc, 1e-5, 1e-5)


@pytest.mark.parametrize("alpha", [0.005 * 147, 0.05, None])
def test_patch_nn_is_the_float64_optimum(alpha):
    keys = image_patches((20, 26))
    queries = keys + 0.05 * torch.randn_like(keys)
    want = reference.patch_nn_exact(queries, keys, alpha)[0]
    assert_equal_idx(patch_nn(queries, keys, alpha, backend="triton", precision="bf16"), want)
    # batched, a key set per batch element
    q2, k2 = torch.stack([queries[:90], queries[90:180]]), torch.stack([keys[:120], keys[120:240]])
    got = patch_nn(q2, k2, alpha, backend="triton", precision="bf16")
    for b in range(2):
        assert_equal_idx(got[b], reference.patch_nn_exact(q2[b], k2[b], alpha)[0])


def test_patch_nn_mutant_without_window_fails(monkeypatch):
    # 1-8 of 280 queries go wrong per noise draw (8 draws seen): three draws together
    keys = image_patches((20, 26))
    draws = [keys + 0.05 * torch.randn_like(keys) for _ in range(3)]
    want = [reference.patch_nn_exact(q, keys, 0.005 * 147)[0] for q in draws]
    monkeypatch.setattr(certified, "bound", lambda dim, weighted=False, fp32=False: (0.0, 0.0))
    got = [patch_nn(q, keys, 0.005 * 147, backend="triton", precision="bf16") for q in draws]
    assert sum(int((g != w).sum()) for g, w in zip(got, want)) > 0


def test_the_kernel_rounds_to_bf16():
    # one key, one query: the screen's lower bound is s~ - E with s~ from bf16-rounded
    # inputs; 1 + 2^-9 rounds to 1 in bf16, so the cross term of (1 + 2^-9) . 1 is 1 exactly
    from fastgen.ops.triton.screen import screen_triton
    q = torch.tensor([[[1 + 2.0 ** -9, 0.0]]])
    k = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]])   # centred: shift (0, 0)
    lower, idx = screen_triton(q, k, None, 16, False, 0.0, 0.0, False)
    got = dict(zip(idx[0, 0].tolist(), lower[0, 0].tolist()))
    assert got[0] == 1.0 - 2.0 and got[1] == 1.0 + 2.0   # ||k||^2 - 2 q^.k^ with q^ = (1, 0)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")   # the interpreter's numpy
def test_overflowing_bounds_go_to_the_sweep():
    # found in review: with a tiny alpha the weighted bound (s - E) w overflowed to -inf
    # (the key looked like an empty slot) or +inf (it never entered one), and the row was
    # answered without that key; likewise huge coordinates (valid inputs) overflow the
    # fp32 distance. Such rows must reach the float64 sweep.
    z = torch.tensor([1e6, 0.0])
    e = certified.bound(2, weighted=True)[0] * (1e6 + 1e6) ** 2
    p = torch.stack([torch.zeros(2), torch.tensor([0.0, e ** 0.5]), z])
    want = reference.patch_nn_exact(p, p, 1e-30)[0]
    assert_equal_idx(patch_nn(p, p, 1e-30, backend="triton", precision="bf16"), want)
    c, x4 = 128.52 * 2.0 ** 55, 252.6 * 2.0 ** 54
    x = torch.tensor([c, c, c, x4], dtype=torch.float64).float()
    keys = torch.stack([x, -x + torch.tensor([0, 0, 0, 1e13])])
    for alpha in (1.0, 0.005):
        want = reference.patch_nn_exact((-x)[None], keys, alpha)[0]
        assert_equal_idx(patch_nn((-x)[None], keys, alpha, backend="triton", precision="bf16"), want)


@pytest.mark.parametrize("call,exc,msg", [
    (lambda: knn(torch.randn(300, 3), torch.randn(300, 3), 129, backend="triton", precision="bf16"),
     ValueError, "k <= 128"),
    (lambda: knn(torch.randn(5, 3), torch.randn(6, 3), backend="torch", precision="bf16"), ValueError,
     "runs on the cpp and triton backends only"),
    (lambda: knn(torch.randn(5, 3), torch.tensor([[float("nan")] * 3]), backend="triton", precision="bf16"),
     ValueError, "keys contains NaN"),
])
def test_bad_inputs(call, exc, msg):
    with pytest.raises(exc, match=msg):
        call()


def test_opcheck_screen():
    from fastgen.ops.triton.screen import screen_triton  # noqa: F401  (registers the op)
    q, k = torch.randn(2, 9, 5), torch.randn(2, 20, 5)
    coef, slack = certified.bound(5)
    torch.library.opcheck(torch.ops.fastgen.screen_triton.default, (q, k, None, 16, False, coef, slack, False))
    w = torch.rand(2, 20)
    torch.library.opcheck(torch.ops.fastgen.screen_triton.default, (q, k, w, 16, False, *certified.bound(5, weighted=True), True))
