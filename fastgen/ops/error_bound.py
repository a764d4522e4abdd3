"""The proven bound on a tile value's rounding error, in Python: the formula of
csrc/engine/error_bound.h (derivation there), for the Triton kernels and the decisions
made in Python. A tile value of the pair (q, k) is within

    E(a, b) = coef * (a + b)^2 + slack,     a = ||q - mu||, b = ||k - mu||

of the exact one, mu the centring shift; coef includes the 1.25 safety factor that also
absorbs the rounding of the bound itself and of the thresholds built from it.
"""
U = 2.0 ** -24           # fp32 unit roundoff
BF16 = 2.0 ** -8         # bf16 unit roundoff (inputs rounded to nearest)
# A GPU tensor core's fp32 accumulation is not specified to round to nearest (it may
# truncate, or keep fewer guard bits): its sums are given 4x fp32's unit roundoff.
TENSOR_CORE_ACC = 2.0 ** -22


def _gamma(dim, u):
    # D u / (1 - D u) bounds a sum of D terms only while D u < 1; past 1/2 no finite
    # bound is claimed (inf: every pair is then "unsure" and decided in float64)
    du = dim * u
    return du / (1.0 - du) if du < 0.5 else float("inf")


def coefficient(dim, input_roundoff=0.0, *, accumulation_roundoff=U, output_roundoff=0.0,
                full_distance=False, weighted=False):
    """coef of E for a dot over `dim` entries whose inputs are rounded by input_roundoff
    (0: fp32, BF16), summed with accumulation_roundoff, its result rounded by
    output_roundoff. full_distance: the value is ||q||^2 + ||k||^2 - 2 q.k (the query's
    own fp32 norm and one more add are in it), not the ranking value ||k||^2 - 2 q.k.
    weighted: the value is multiplied by an fp32 weight w (rounded once from float64)
    and E is then in units of w (the caller multiplies by w)."""
    u, ub, uo = U, input_roundoff, output_roundoff
    g_norm, g_acc = _gamma(dim, u), _gamma(dim, accumulation_roundoff)
    rel = (3.0 * u + 1.01 * u + g_norm + 0.5 * (2.0 * ub + ub * ub) + 0.5 * g_acc * (1.0 + ub) ** 2
           + 0.5 * uo * (1.0 + ub) ** 2 * (1.0 + g_acc))
    if full_distance:
        rel += g_norm + 1.01 * u
    if weighted:
        rel += 2.01 * u
    return 1.25 * rel


def slack(dim):
    """E's absolute term: bf16 products and tensor cores may flush denormals to zero."""
    return 1.25 * 1e-30 * (dim + 1)
