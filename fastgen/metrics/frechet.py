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
    def load(cls, path, name=None):
        """Statistics from a file: an .npz of mu (D,), sigma (D, D) and optionally n
        (FeatureStats.save, pytorch-fid's files), or an .npy (N, D) array of features (their
        statistics are computed). An .npz is checked: shapes, finite values, sigma symmetric
        and positive semi-definite within rounding; errors name the file and the field."""
        label = f"{name} {path!r}" if name else repr(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no statistics file at {path!r}" + (f" ({name})" if name else ""))
        try:
            obj = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            why = "not a NumPy .npy/.npz file" if "pickle" in str(e) else str(e)
            raise ValueError(f"{label} is neither a statistics .npz (mu, sigma) nor a .npy array of (N, D) "
                             f"features ({why})") from None
        if isinstance(obj, np.ndarray):           # .npy: the features themselves
            if obj.dtype.kind not in "fiu":
                raise TypeError(f"{label}: a .npy of features must hold numbers, got dtype {obj.dtype}")
            return cls.of(np.ascontiguousarray(obj, np.float64), f"{label} (.npy features)")
        try:
            with obj as z:
                mu, sigma = np.asarray(z["mu"], np.float64), np.asarray(z["sigma"], np.float64)
                n = np.asarray(z["n"]) if "n" in z else None
        except (KeyError, ValueError, TypeError, OSError) as e:
            raise ValueError(f"{label} is not a statistics .npz with 'mu' and 'sigma' ({e})") from None
        n = _check_stats(label, mu, sigma, n)
        s = cls(mu.shape[0])
        s._mu, s._sigma, s.n = torch.from_numpy(mu), torch.from_numpy(sigma), n
        return s

    @classmethod
    def of(cls, feats, name="features"):
        return cls().update(feats, name)


# loaded statistics: sigma may be asymmetric, or have negative eigenvalues, by this much
# relative to its largest entry / eigenvalue (rounding of float32-stored files included)
STATS_RTOL = 1e-5


def _check_stats(label, mu, sigma, n):
    """Validated (mu, sigma, n) of a statistics file: n as an int (0: not recorded)."""
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{label}: mu must be (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}")
    if mu.shape[0] == 0:
        raise ValueError(f"{label}: mu is empty (D = 0 features)")
    for field, v in (("mu", mu), ("sigma", sigma)):
        if not np.isfinite(v).all():
            raise ValueError(f"{label}: {field} contains NaN or infinite values")
    scale = float(np.abs(sigma).max())
    asym = float(np.abs(sigma - sigma.T).max())
    if asym > STATS_RTOL * scale:
        raise ValueError(f"{label}: sigma is not symmetric (max |sigma - sigma.T| = {asym:.3g}, "
                         f"max |sigma| = {scale:.3g}): not a covariance matrix")
    w = np.linalg.eigvalsh((sigma + sigma.T) / 2)
    if w.size and w[0] < -STATS_RTOL * max(float(np.abs(w).max()), 1e-300):
        raise ValueError(f"{label}: sigma is not positive semi-definite (smallest eigenvalue {w[0]:.3g}, "
                         f"largest {w[-1]:.3g}): not a covariance matrix")
    if n is None:
        return 0
    if n.ndim != 0 or n.dtype.kind not in "iuf" or not np.isfinite(n) or float(n) < 0 or float(n) != int(n):
        raise ValueError(f"{label}: n must be a non-negative integer (the number of feature vectors), "
                         f"got {n.tolist()!r}")
    return int(n)


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
        return FeatureStats.load(os.fspath(x), name)
    return FeatureStats.of(x, name)


def _sym_sqrt(s):
    w, v = torch.linalg.eigh(s)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(real, fake):
    """Frechet distance between two feature distributions (Gaussian fits).

    Args:
        real, fake: (N, D) features (tensors or numpy arrays), FeatureStats, or paths of
            .npz statistics (FeatureStats.save; pytorch-fid's mu/sigma files too; checked
            as FeatureStats.load says) or of .npy (N, D) feature arrays.

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
