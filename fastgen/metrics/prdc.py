"""fastgen.metrics.prdc: precision, recall, density and coverage of generated samples
(Kynkaanniemi et al. 2019; Naeem et al. 2020), from k-nearest-neighbour balls in a
feature space, without an N x M distance matrix.

With real features X (N, D), fake features Y (M, D) and r_i the distance from x_i to its
k-th nearest other real point (s_j likewise among the fakes):
    precision = 1/M  sum_j [ exists i: ||y_j - x_i|| <= r_i ]      fakes on the real manifold
    recall    = 1/N  sum_i [ exists j: ||x_i - y_j|| <= s_j ]      reals on the fake manifold
    density   = 1/(kM) sum_j #{ i: ||y_j - x_i|| <= r_i }          like precision, counts balls
    coverage  = 1/N  sum_i [ min_j ||x_i - y_j|| <= r_i ]          reals with a fake nearby
The radii come from `fastgen.ops.knn` (exact); ball membership (and, in the same pass,
each real's nearest fake) is computed in chunks of rows, so memory stays O(chunk x N), never N x M. Every distance
is compared squared and rounded to float32 after an accurate float64 computation, the
way knn reports its distances: a point exactly on a ball's boundary is inside it (<=, as
in Kynkaanniemi et al.'s code; the `prdc` package of Naeem et al. uses a strict <, which
differs only for points exactly on a boundary: duplicates, discrete data).
"""
import torch

from fastgen.ops import knn
from fastgen.ops import _validate

# rows of the membership test per chunk: chunk x (other set) x D float64 differences
_CHUNK_ELEMENTS = 1 << 24


def _radii(x, k, name):
    """Squared distance of every row of x to its k-th nearest other row (float32)."""
    if x.shape[0] <= k:
        raise ValueError(f"{name} needs more than k={k} points for k-NN radii, got {x.shape[0]}")
    return knn(x, x, k, exclude_self=True)[0][:, k - 1].float()


def _ball_counts(points, centres, radii2):
    """For each point: how many balls (centre_i, radius_i) contain it, and its squared
    distance to the nearest centre; chunked over the points."""
    counts = torch.empty(points.shape[0], dtype=torch.long, device=points.device)
    nearest = torch.empty(points.shape[0], dtype=torch.float32, device=points.device)
    c64 = centres.double()
    rows = max(1, _CHUNK_ELEMENTS // max(1, centres.shape[0] * centres.shape[1]))
    for s in range(0, points.shape[0], rows):
        p = points[s:s + rows].double()
        d2 = (p[:, None, :] - c64[None]).pow_(2).sum(-1).float()       # (rows, centres)
        counts[s:s + rows] = (d2 <= radii2[None]).sum(1)
        nearest[s:s + rows] = d2.min(1).values
    return counts, nearest


def precision_recall_density_coverage(real, fake, k=5):
    """Returns {"precision", "recall", "density", "coverage"} as Python floats.

    Args:
        real: (N, D) features of real data (N > k), float32/float16/bfloat16.
        fake: (M, D) features of generated samples (M > k), same dtype and device.
        k: neighbourhood size of the balls (the papers use 5).
    """
    _validate.points(real, "real", ndims=(2,))
    _validate.points(fake, "fake", ndims=(2,))
    _validate.same_kind(real, "real", fake, "fake")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    _validate.finite(real, "real")
    _validate.finite(fake, "fake")
    r_real = _radii(real, k, "real")
    r_fake = _radii(fake, k, "fake")
    in_real, _ = _ball_counts(fake, real, r_real)             # per fake: real balls containing it
    in_fake, nearest_fake = _ball_counts(real, fake, r_fake)  # per real: fake balls, nearest fake
    return {
        "precision": float((in_real > 0).float().mean()),
        "recall": float((in_fake > 0).float().mean()),
        "density": float(in_real.double().sum() / (k * fake.shape[0])),
        "coverage": float((nearest_fake <= r_real).float().mean()),
    }
