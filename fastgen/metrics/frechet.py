"""fastgen.metrics.frechet: the Frechet distance between two feature sets (the "FD" of
FID when the features are Inception's; here any extractor's), and its streaming form.

    FD = ||mu_1 - mu_2||^2 + tr(S_1) + tr(S_2) - 2 tr((S_1 S_2)^(1/2))

Means and covariances are float64 (covariance with N - 1, as numpy.cov and pytorch-fid).
The trace of the matrix square root is computed as the sum of the square roots of the
eigenvalues of S_1^(1/2) S_2 S_1^(1/2) -- a symmetric positive semi-definite matrix
with the same spectrum as S_1 S_2 -- so it is real by construction: no complex
intermediate, no discarded imaginary part, and a singular S_1 or S_2 (fewer samples than
features) needs no rescue (pytorch-fid adds 1e-6 I when scipy's sqrtm fails; here a
warning says the estimate is unreliable and the value is the one of the exact formula).
"""
import os
import warnings

import numpy as np
import torch


class FeatureStats:
    """Running mean and covariance of feature batches (float64), saved as .npz
    (mu, sigma, n). Batches are accumulated around the first batch's mean, which keeps
    the sums of outer products from cancelling when features sit far from zero."""

    def __init__(self, dim=None):
        self.dim = dim
        self.n = 0
        self._shift = None
        self._sum = None
        self._outer = None
        self._mu = self._sigma = None   # set when loaded from a file

    def update(self, feats, name="features"):
        x = _as_matrix(feats, name)
        if self._mu is not None:
            raise ValueError("these statistics were loaded from a file; they cannot be updated")
        if self.dim is None:
            self.dim = x.shape[1]
        if x.shape[1] != self.dim:
            raise ValueError(f"{name} has D={x.shape[1]} features but earlier batches had D={self.dim}")
        if x.shape[0] == 0:
            return self
        if self._shift is None:
            self._shift = x.mean(0)
            self._sum = torch.zeros(self.dim, dtype=torch.float64)
            self._outer = torch.zeros(self.dim, self.dim, dtype=torch.float64)
        xc = x - self._shift
        self._sum += xc.sum(0)
        self._outer += xc.T @ xc
        self.n += x.shape[0]
        return self

    @property
    def mu(self):
        if self._mu is not None:
            return self._mu
        self._need(1)
        return self._shift + self._sum / self.n

    @property
    def sigma(self):
        if self._sigma is not None:
            return self._sigma
        self._need(2)
        m = self._sum / self.n
        return (self._outer - self.n * torch.outer(m, m)) / (self.n - 1)

    def _need(self, k):
        if self.n < k:
            raise ValueError(f"statistics need at least {k} feature vectors, got {self.n}")

    def save(self, path):
        from fastgen.training import atomic_write
        mu, sigma = self.mu.numpy(), self.sigma.numpy()
        atomic_write(path, lambda f: np.savez(f, mu=mu, sigma=sigma, n=np.int64(self.n)))
        return path

    @classmethod
    def load(cls, path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no statistics file at {path!r}")
        try:
            with np.load(path) as z:
                mu, sigma = np.asarray(z["mu"], np.float64), np.asarray(z["sigma"], np.float64)
                n = int(z["n"]) if "n" in z else 0
        except (KeyError, ValueError, OSError) as e:
            raise ValueError(f"{path!r} is not a statistics .npz with 'mu' and 'sigma' ({e})") from None
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ValueError(f"{path!r}: mu must be (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}")
        s = cls(mu.shape[0])
        s._mu, s._sigma, s.n = torch.from_numpy(mu), torch.from_numpy(sigma), n
        return s

    @classmethod
    def of(cls, feats, name="features"):
        return cls().update(feats, name)


def _as_matrix(feats, name):
    if isinstance(feats, np.ndarray):
        feats = torch.from_numpy(feats)
    if not isinstance(feats, torch.Tensor):
        raise TypeError(f"{name} must be a (N, D) tensor or array of features, got {type(feats).__name__}")
    if feats.dim() != 2:
        raise ValueError(f"{name} must be (N, D) features, got shape {tuple(feats.shape)}")
    if not (feats.is_floating_point() or feats.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"{name} must be float features, got {feats.dtype}")
    x = feats.detach().to("cpu", torch.float64)
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def _stats(x, name):
    if isinstance(x, FeatureStats):
        return x
    if isinstance(x, (str, os.PathLike)):
        return FeatureStats.load(os.fspath(x))
    return FeatureStats.of(x, name)


def _sym_sqrt(s):
    w, v = torch.linalg.eigh(s)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(real, fake):
    """Frechet distance between two feature distributions (Gaussian fits).

    Args:
        real, fake: (N, D) features (tensors or numpy arrays), FeatureStats, or paths of
            .npz statistics (FeatureStats.save; pytorch-fid's mu/sigma files too).

    Returns:
        float. Warns when a covariance is singular (fewer vectors than D + 1): the value
        is then the exact formula's on a rank-deficient estimate, which is biased.
    """
    a, b = _stats(real, "real"), _stats(fake, "fake")
    if a.dim != b.dim:
        raise ValueError(f"real has D={a.dim} features but fake has D={b.dim}")
    mu1, mu2, s1, s2 = a.mu, b.mu, a.sigma, b.sigma
    for st, name in ((a, "real"), (b, "fake")):
        if 0 < st.n < st.dim + 1:
            warnings.warn(f"{name} has {st.n} feature vectors for D={st.dim} features: its covariance is "
                          "singular and the Frechet distance biased; use more than D samples", stacklevel=2)
    s1 = (s1 + s1.T) / 2
    s2 = (s2 + s2.T) / 2
    r1 = _sym_sqrt(s1)
    m = r1 @ s2 @ r1
    tr_covmean = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + torch.trace(s1) + torch.trace(s2) - 2 * tr_covmean)
