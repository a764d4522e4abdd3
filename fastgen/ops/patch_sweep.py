"""patch_nn's sweep: both passes over every (query, key) pair, on one backend.

Below patch_nn (which adds the pruned path through PatchIndex) and PatchIndex (whose
unpruned searches run it), so neither imports the other.
"""
import torch

from fastgen.ops import _validate, baselines
from fastgen.ops.unit_scale import unit_scale


def unit_scaled(q3, k3, alpha, be):
    """(q3, k3, alpha) moved to unit scale where fp32 squares would under- or overflow,
    after the distance-input checks every backend applies. (B, N, D) and (B or 1, M, D)."""
    # fp32 squares of data far from unit scale underflow (every key ties) or overflow:
    # move it to unit scale by a power of two (exact), alpha with it (the score
    # d / (alpha + c) is unchanged when d, c and alpha scale alike). An alpha that would
    # leave fp32's range dominates (tiny data: the score is d / alpha, plain nearest
    # neighbour) or vanishes (huge data: d / c) beside the scaled distances.
    scale = unit_scale(q3, k3)
    if be != "cpp" or scale not in (None, 1.0):   # the C++ op checks the same in its first pass
        _validate.distance_inputs(q3, "queries", k3, "keys")
    if scale not in (None, 1.0):
        if alpha is not None:
            alpha = alpha / scale ** 2
            alpha = None if alpha > 1e30 else max(alpha, 1e-30)
        q3, k3 = q3 / scale, k3 / scale
    return q3, k3, alpha


def patch_nn_sweep(q3, k3, alpha, be, precision):
    """idx (B, N): patch_nn of (B, N, D) queries against (B, M, D) keys on backend `be`
    ("cpp", "triton" or "torch"), every pair computed; inputs checked here."""
    q3, k3, alpha = unit_scaled(q3, k3, alpha, be)
    if be == "cpp":
        idx = torch.ops.fastgen.patch_nn(q3.contiguous(), k3.contiguous(), alpha, precision)
    elif be == "triton" and precision == "bf16":   # bf16 screens, exact float64 answer
        from fastgen.ops.certified import patch_nn_screened
        idx = patch_nn_screened(q3, k3, alpha)
    elif be == "triton":  # fp32 tiles; plain NN = exact kNN with k=1 (the fp32 screen)
        if alpha is None:
            from fastgen.ops.certified import knn_screened
            idx = knn_screened(q3, k3, 1, False, fp32=True)[1][..., 0]
        else:
            from fastgen.ops.triton.patch_nn import patch_nn_triton
            idx = patch_nn_triton(q3, k3, alpha)
    else:
        idx = torch.stack([baselines.patch_nn_two_pass(q3[b], k3[b], alpha) for b in range(q3.shape[0])])
    return idx
