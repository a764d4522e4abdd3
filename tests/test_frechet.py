"""fastgen.metrics.frechet_distance against a direct float64 computation and against
pytorch-fid's calculate_frechet_distance on the same features; the streaming form."""
import ast
import os
import warnings

import numpy as np
import pytest
import torch

from fastgen.metrics import FeatureStats, frechet_distance


def pytorch_fid_formula():
    """pytorch-fid's own function, read from its installed source: importing its module
    would import torchvision, which make test does not install (see the Makefile)."""
    fid = pytest.importorskip("pytorch_fid", reason="pytorch-fid is a test dependency (make test installs it)")
    scipy_linalg = pytest.importorskip("scipy.linalg")
    src = open(os.path.join(os.path.dirname(fid.__file__), "fid_score.py")).read()
    fn = [n for n in ast.parse(src).body if isinstance(n, ast.FunctionDef) and n.name == "calculate_frechet_distance"]
    ns = {"np": np, "linalg": scipy_linalg}
    exec(compile(ast.Module(fn, []), "fid_score.py", "exec"), ns)
    return ns["calculate_frechet_distance"]


def features(n, d, seed, shift=0.0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d ** 0.5
    return (torch.randn(n, d, generator=g) @ mix) * scale + shift


def direct(a, b):
    """The formula with an eigendecomposition of S1 S2 (float64, numpy), independent of
    the implementation's symmetric form."""
    a, b = a.double().numpy(), b.double().numpy()
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ev = np.linalg.eigvals(s1 @ s2)
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2)
                 - 2 * np.sqrt(np.clip(ev.real, 0, None)).sum())


@pytest.mark.parametrize("d", [2, 7, 64])
def test_matches_pytorch_fid_and_the_direct_formula(d):
    calc = pytorch_fid_formula()
    seed = int(torch.randint(0, 2 ** 31, (1,)))
    a, b = features(500, d, seed), features(400, d, seed + 1, shift=0.3, scale=1.2)
    got = frechet_distance(a, b)
    want = calc(a.double().numpy().mean(0), np.atleast_2d(np.cov(a.double().numpy(), rowvar=False)),
                b.double().numpy().mean(0), np.atleast_2d(np.cov(b.double().numpy(), rowvar=False)))
    assert got == pytest.approx(float(want), rel=1e-6)
    assert got == pytest.approx(direct(a, b), rel=1e-6)


def test_one_feature_is_the_gaussian_formula():
    a, b = features(300, 1, 8), features(200, 1, 9, shift=0.5, scale=2.0)
    m1, m2 = a.double().mean(), b.double().mean()
    v1, v2 = a.double().var(), b.double().var()
    assert frechet_distance(a, b) == pytest.approx(float((m1 - m2) ** 2 + v1 + v2 - 2 * (v1 * v2).sqrt()), rel=1e-9)


def test_properties():
    a = features(300, 16, 1)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    # a pure shift by v adds ||v||^2
    v = torch.linspace(-1, 1, 16)
    assert frechet_distance(a, a + v) == pytest.approx(float(v.double() @ v.double()), rel=1e-6)
    assert frechet_distance(a, a * 2) > frechet_distance(a, a * 1.1) > 0


def test_streaming_stats_equal_the_one_shot_value(tmp_path):
    a, b = features(1000, 32, 2, shift=1e3), features(700, 32, 3, shift=1e3 + 0.5)
    st = FeatureStats()
    for chunk in a.split(77):
        st.update(chunk)
    assert st.n == 1000
    assert torch.allclose(st.mu, a.double().mean(0), rtol=0, atol=1e-9)
    assert torch.allclose(st.sigma, torch.from_numpy(np.cov(a.double().numpy(), rowvar=False)), atol=1e-9)
    one = frechet_distance(a, b)
    assert frechet_distance(st, b) == pytest.approx(one, rel=1e-9)
    path = st.save(str(tmp_path / "real.npz"))
    assert frechet_distance(path, b) == pytest.approx(one, rel=1e-9)
    assert FeatureStats.load(path).n == 1000
    with pytest.raises(ValueError, match="loaded from a file"):
        FeatureStats.load(path).update(a)


def test_singular_covariance_warns_and_still_answers():
    a, b = features(10, 32, 4), features(12, 32, 5)
    with pytest.warns(UserWarning, match="real has 10 feature vectors for D=32"):
        v = frechet_distance(a, b)
    assert np.isfinite(v) and v > 0


@pytest.mark.parametrize("call,exc,msg", [
    (lambda: frechet_distance(torch.randn(10, 3), torch.randn(10, 4)), ValueError, "real has D=3 features but fake has D=4"),
    (lambda: frechet_distance(torch.randn(10), torch.randn(10, 4)), ValueError, r"real must be \(N, D\)"),
    (lambda: frechet_distance(torch.randn(1, 3), torch.randn(10, 3)), ValueError, "at least 2 feature vectors"),
    (lambda: frechet_distance(torch.full((5, 3), float("nan")), torch.randn(10, 3)), ValueError, "real contains NaN"),
    (lambda: frechet_distance(torch.randn(5, 3), "nope.npz"), FileNotFoundError, "nope.npz"),
    (lambda: frechet_distance(torch.randn(5, 3), [1, 2]), TypeError, "fake must be"),
])
def test_bad_inputs(call, exc, msg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(exc, match=msg):
            call()


def test_bad_stats_file(tmp_path):
    p = tmp_path / "bad.npz"
    np.savez(p, mu=np.zeros(3), sigma=np.zeros((2, 2)))
    with pytest.raises(ValueError, match="mu must be"):
        frechet_distance(str(p), torch.randn(5, 3))
    q = tmp_path / "other.npz"
    np.savez(q, something=np.zeros(3))
    with pytest.raises(ValueError, match="not a statistics .npz"):
        frechet_distance(str(q), torch.randn(5, 3))


def test_npy_features_path_is_accepted(tmp_path):
    """A .npy path gave a TypeError (np.load returns an array, not an .npz archive)."""
    a, b = features(200, 6, 11).numpy(), features(150, 6, 12)
    path = str(tmp_path / "real.npy")
    np.save(path, a)
    assert frechet_distance(path, b) == pytest.approx(frechet_distance(a, b), rel=1e-12)
    assert frechet_distance(b, tmp_path / "real.npy") == pytest.approx(frechet_distance(b, a), rel=1e-12)
    np.save(tmp_path / "img.npy", np.zeros((4, 1, 3, 3), np.float32))
    with pytest.raises(ValueError, match=r"fake .*img.npy.* must be \(N, D\) features"):
        frechet_distance(b, str(tmp_path / "img.npy"))
    np.save(tmp_path / "nan.npy", np.full((9, 6), np.nan))
    with pytest.raises(ValueError, match="nan.npy.*contains NaN"):
        frechet_distance(str(tmp_path / "nan.npy"), b)
    (tmp_path / "junk.npy").write_text("not numpy")
    with pytest.raises(ValueError, match="junk.npy.* is neither a statistics .npz"):
        frechet_distance(str(tmp_path / "junk.npy"), b)


@pytest.mark.parametrize("mu, sigma, extra, msg", [
    (np.array([np.nan, 0, 0]), np.eye(3), {}, "mu contains NaN or infinite"),
    (np.zeros(3), np.diag([1.0, np.inf, 1.0]), {}, "sigma contains NaN or infinite"),
    (np.zeros(3), -np.eye(3), {}, "sigma is not positive semi-definite"),
    (np.zeros(3), np.diag([1.0, 1.0, -0.01]), {}, "sigma is not positive semi-definite"),
    (np.zeros(3), np.triu(np.ones((3, 3))), {}, "sigma is not symmetric"),
    (np.zeros(0), np.zeros((0, 0)), {}, "mu is empty"),
    (np.zeros(3), np.eye(3), {"n": np.int64(-4)}, "n must be a non-negative integer"),
])
def test_loaded_statistics_are_validated(tmp_path, mu, sigma, extra, msg):
    """NaN mu returned nan and sigma = -I a number: each field is checked, the error names
    the file and the field."""
    path = str(tmp_path / "stats.npz")
    np.savez(path, mu=mu, sigma=sigma, **extra)
    with pytest.raises(ValueError, match="stats.npz'?: " + msg):
        frechet_distance(path, torch.randn(20, 3))


def test_statistics_within_rounding_are_accepted(tmp_path):
    """A singular covariance (fewer vectors than D) stored in float32, with eigenvalues a
    rounding below zero and a rounding of asymmetry, is still a covariance."""
    x = features(5, 16, 13).double()
    sigma = np.cov(x.numpy(), rowvar=False).astype(np.float32)
    sigma[0, 1] += 1e-9
    path = str(tmp_path / "s.npz")
    np.savez(path, mu=x.mean(0).numpy().astype(np.float32), sigma=sigma, n=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # 5 vectors for D=16: the singular-covariance warning
        assert np.isfinite(frechet_distance(path, features(40, 16, 14)))
