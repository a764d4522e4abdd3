"""fastgen.metrics.prdc: precision, recall, density and coverage of generated samples
(Kynkaanniemi et al. 2019; Naeem et al. 2020), from k-nearest-neighbour balls in a
feature space, without an N x M distance matrix.

With real features X (N, D), fake features Y (M, D) and r_i the distance from x_i to its
k-th nearest other real point (s_j likewise among the fakes):
    precision = 1/M  sum_j [ exists i: ||y_j - x_i|| <= r_i ]      fakes on the real manifold
    recall    = 1/N  sum_i [ exists j: ||x_i - y_j|| <= s_j ]      reals on the fake manifold
    density   = 1/(kM) sum_j #{ i: ||y_j - x_i|| <= r_i }          like precision, counts balls
    coverage  = 1/N  sum_i [ min_j ||x_i - y_j|| <= r_i ]          reals with a fake nearby
The radii come from `fastgen.ops.knn` and ball membership (with each real's nearest
fake, in the same sweep) from `fastgen.ops.ball_count`, both exact and on the tiled
distance engine: memory O(N + M), never N x M. Distances are compared squared, as the
float64 value rounded to float32, the way knn reports them: a point exactly on a ball's
boundary is inside it (<=, as in Kynkaanniemi et al.'s code; the `prdc` package of Naeem
et al. uses a strict <, which differs only for points exactly on a boundary: duplicates,
discrete data).
"""
from fastgen.ops import ball_count, checks, knn



def _radii(x, k, name, backend, precision):
    """Squared distance of every row of x to its k-th nearest other row (float32)."""
    if x.shape[0] <= k:
        raise ValueError(f"{name} needs more than k={k} points for k-NN radii, got {x.shape[0]}")
    return knn(x, x, k, exclude_self=True, backend=backend, precision=precision, prune=False)[0][:, k - 1].float()


def precision_recall_density_coverage(real, fake, k=5, *, backend="auto", precision="fp32"):
    """Returns {"precision", "recall", "density", "coverage"} as Python floats.

    Args:
        real: (N, D) features of real data (N > k), float32/float16/bfloat16.
        fake: (M, D) features of generated samples (M > k), same dtype and device.
        k: neighbourhood size of the balls (the papers use 5).
        backend, precision: as in `fastgen.ops.knn` ("bf16": the cpp backend's certified
            bf16 sweep, the same answers about twice as fast at large D).
    """
    checks.points(real, "real", ndims=(2,))
    checks.points(fake, "fake", ndims=(2,))
    checks.same_kind(real, "real", fake, "fake")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    checks.finite(real, "real")
    checks.finite(fake, "fake")
    r_real = _radii(real, k, "real", backend, precision)
    r_fake = _radii(fake, k, "fake", backend, precision)
    in_real = ball_count(fake, real, r_real, backend=backend, precision=precision).count   # per fake: real balls
    in_fake, nearest_fake, _ = ball_count(real, fake, r_fake, backend=backend, precision=precision)  # per real
    return {
        "precision": float((in_real > 0).double().mean()),
        "recall": float((in_fake > 0).double().mean()),
        "density": float(in_real.double().sum() / (k * fake.shape[0])),
        "coverage": float((nearest_fake <= r_real).double().mean()),
    }
