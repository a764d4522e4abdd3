"""fastgen.ops.unit_scale: the power of two that moves far-from-unit data to unit scale.

fp32 bounds and squared distances of data far from unit scale underflow to 0 (tiny data:
every key ties, or every key is ruled out) or overflow. Dividing by a power of two is
exact (unless a coordinate becomes subnormal), so the same keys win on the scaled data.
"""
import math

import torch

# data whose largest coordinate lies in [2^-SCALE_RANGE, 2^SCALE_RANGE] is searched as it
# is: its squared distances and the bounds' fp32 terms (D (||q|| + ||c||)^2 2^-23) stay
# far from fp32's underflow and overflow
SCALE_RANGE = 24


def unit_scale(queries, keys):
    """1.0 when the data's scale is safe for fp32 squared distances and bounds, else the
    power of two s that brings its largest |coordinate| into [0.5, 1); None when dividing
    by s would make a non-zero coordinate subnormal (rounded: the winners could change)."""
    queries, keys = queries.detach(), keys.detach()
    top = max(_largest_magnitude(queries), _largest_magnitude(keys))
    if top == 0.0 or not math.isfinite(top) or 2.0 ** -SCALE_RANGE <= top <= 2.0 ** SCALE_RANGE:
        return 1.0
    scale = 2.0 ** math.frexp(top)[1]
    if scale > 1.0:
        tiny = min(_smallest_nonzero(queries), _smallest_nonzero(keys))
        if tiny / scale < torch.finfo(torch.float32).tiny:
            return None
    return scale


def _largest_magnitude(x):
    """max |x| by one min/max reduction (no |x| temporary); NaN propagates."""
    if not x.numel():
        return 0.0
    lo, hi = torch.aminmax(x)
    return max(-float(lo), float(hi))


def _smallest_nonzero(x):
    a = x.abs()
    a = a[a > 0]
    return float(a.amin()) if a.numel() else math.inf
