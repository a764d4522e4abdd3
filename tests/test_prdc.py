"""fastgen.metrics.precision_recall_density_coverage against the papers' formulas on the
whole float64 distance matrix (small sets), plus properties that pin each metric."""
import pytest
import torch

from conftest import backends
from fastgen.metrics import precision_recall_density_coverage as prdc


def reference(real, fake, k):
    """The formulas on full float64 matrices, squared distances rounded to float32 (the
    metric's own rule), boundary inclusive."""
    def sq(a, b):
        return (a.double()[:, None] - b.double()[None]).pow(2).sum(-1).float()
    rr, ff, rf = sq(real, real), sq(fake, fake), sq(real, fake)           # rf: (N, M)
    r_real = rr.sort(1).values[:, k]          # column 0 is the point itself (distance 0)
    r_fake = ff.sort(1).values[:, k]
    inside = rf <= r_real[:, None]            # fake j in the ball of real i
    return {
        "precision": inside.any(0).double().mean().item(),
        "recall": (rf <= r_fake[None]).any(1).double().mean().item(),
        "density": inside.sum().item() / (k * fake.shape[0]),
        "coverage": (rf.min(1).values <= r_real).double().mean().item(),
    }


def assert_metrics(got, want):
    assert set(got) == {"precision", "recall", "density", "coverage"}
    for name in want:
        assert got[name] == pytest.approx(want[name], abs=1e-9), name


@pytest.mark.parametrize("n,m,d,k", [(12, 9, 1, 1), (60, 80, 3, 5), (200, 150, 16, 3), (31, 40, 64, 7)])
@pytest.mark.parametrize("shift", [0.0, 0.7])
def test_matches_the_formulas(n, m, d, k, shift):
    gen = torch.Generator().manual_seed(n + m + d)
    real = torch.randn(n, d, generator=gen)
    fake = 1.3 * torch.randn(m, d, generator=gen) + shift       # partly overlapping manifolds
    got = prdc(real, fake, k)
    assert_metrics(got, reference(real, fake, k))
    assert 0 < got["precision"] < 1 or shift == 0.0


def test_identical_sets():
    # every fake sits in its own real's ball and in the balls of the reals that have it
    # among their k nearest: density (N + N k) / (k N) when no distances tie
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(300, 6, generator=gen)
    got = prdc(x, x.clone(), k=4)
    assert_metrics(got, {"precision": 1.0, "recall": 1.0, "coverage": 1.0, "density": 5 / 4})


def test_far_apart_sets():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(100, 5, generator=gen)
    assert_metrics(prdc(x, x + 100.0, k=5), {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0})


def test_boundary_points_are_inside():
    # integer points: a fake exactly at a real's k-th neighbour distance counts
    real = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    fake = torch.tensor([[0.0, -1.0], [5.0, 5.0], [6.0, 5.0], [5.0, 6.0]])
    got = prdc(real, fake, k=1)                                # every real radius is 1
    want = reference(real, fake, 1)
    assert_metrics(got, want)
    assert got["precision"] == 0.25 and got["coverage"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_every_backend_and_precision_gives_the_same_metrics(backend, precision):
    gen = torch.Generator().manual_seed(3)
    real, fake = torch.randn(90, 40, generator=gen), torch.randn(70, 40, generator=gen) + 0.3
    if precision == "bf16" and backend != "cpp":
        return   # bf16 exists on the cpp backend only (ball_count's tests check the refusal)
    assert_metrics(prdc(real, fake, 3, backend=backend, precision=precision), reference(real, fake, 3))


def test_equals_the_prdc_package():
    """Naeem et al.'s `prdc` on the same features (it uses Euclidean distances and a strict
    <, which only differs from fastgen on exact boundaries: none in continuous data)."""
    peer = pytest.importorskip("prdc", reason="the prdc package is a test dependency (make test installs it)")
    gen = torch.Generator().manual_seed(5)
    real, fake = torch.randn(400, 64, generator=gen), torch.randn(300, 64, generator=gen) * 1.2 + 0.2
    want = peer.compute_prdc(real.double().numpy(), fake.double().numpy(), nearest_k=5)
    got = prdc(real, fake, 5)
    for name in ("precision", "recall", "density", "coverage"):
        assert got[name] == pytest.approx(float(want[name]), abs=1e-12), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(dtype):
    gen = torch.Generator().manual_seed(4)
    real, fake = torch.randn(50, 8, generator=gen).to(dtype), torch.randn(40, 8, generator=gen).to(dtype)
    assert_metrics(prdc(real, fake, 3), reference(real, fake, 3))


@pytest.mark.parametrize("call,exc,msg", [
    (lambda: prdc(torch.randn(10, 3), torch.randn(10, 4)), ValueError, "D=3"),
    (lambda: prdc(torch.randn(10, 3), torch.randn(10, 3).half()), TypeError, "fake is torch.float16"),
    (lambda: prdc(torch.randn(2, 10, 3), torch.randn(10, 3)), ValueError, "real must be 2-D"),
    (lambda: prdc(torch.randn(10, 3), torch.randn(10, 3).double()), TypeError, "fake must be float32"),
    (lambda: prdc(torch.randn(10, 3), torch.randn(10, 3), k=0), ValueError, "k must be an int >= 1"),
    (lambda: prdc(torch.randn(10, 3), torch.randn(10, 3), k=2.0), ValueError, "k must be an int"),
    (lambda: prdc(torch.randn(10, 3), torch.randn(10, 3), k=True), ValueError, "k must be an int"),
    (lambda: prdc(torch.randn(5, 3), torch.randn(10, 3), k=5), ValueError, "real needs more than k=5 points"),
    (lambda: prdc(torch.randn(10, 3), torch.randn(3, 3), k=3), ValueError, "fake needs more than k=3 points"),
    (lambda: prdc(torch.full((10, 3), float("nan")), torch.randn(10, 3)), ValueError, "real"),
    (lambda: prdc(torch.randn(10, 3), [[0.0] * 3] * 10), TypeError, "fake must be a torch.Tensor"),
])
def test_bad_inputs(call, exc, msg):
    with pytest.raises(exc, match=msg):
        call()
