"""fastgen.ops.patch_nn: GPNN's normalised patch nearest neighbour, no N x M matrix.

Two passes (column minimum, then normalised argmin). On the CPU both are pruned by
default through a one-shot `PatchIndex` (fastgen/ops/patch_index.py): keys are grouped
by k-means, and the triangle inequality proves which key ranges can still change a
query's (or a key's) minimum, so only those are computed. To search the same keys
many times (GPNN: ten iterations per level) build a PatchIndex once and call its
`search`.
"""
import torch

from fastgen import _ext
from fastgen.ops import _backend, _validate
from fastgen.ops.patch_index import PatchIndex
from fastgen.ops.patch_sweep import patch_nn_sweep, unit_scaled


def patch_nn(queries, keys, alpha=0.005, *, backend="auto", precision="fp32", prune=True, hint=None):
    """For every query patch, the key patch minimising ||q - k||^2 / (alpha + min_q' ||q' - k||^2).

    The denominator is how well key k is already covered by the closest query; dividing
    by it steers queries towards keys nobody uses yet, which is what keeps GPNN's
    outputs from collapsing onto a few source patches (Granot et al., CVPR 2022).

    Args:
        queries: (N, D) or (B, N, D) flattened patches, float32/float16/bfloat16.
        keys: (M, D) or (B, M, D), same dtype and device.
        alpha: > 0, small = strong push to use every key (0.005 for sampling); None
            gives the plain (exact) nearest neighbour.
        backend: "auto", "cpp", "triton" (two passes, no pruning; verified under
            TRITON_INTERPRET=1 and compiled for sm_80/sm_90, never run on a GPU), or "torch" (the two-pass chunked PyTorch method).
        precision: "fp32", or "bf16" for a bf16 cross term (cpp and triton backends;
            torch raises). Scores are fp32: natural patches are
            full of near-ties, so different backends may pick different keys of
            (within fp32 rounding) equal score -- except triton with bf16, which screens
            with bf16 tensor cores and re-ranks in float64: the float64 optimum, exactly
            (fastgen/ops/certified.py).
        prune: skip what provably cannot change the answer (cpp backend with an alpha;
            elsewhere every tile is computed). The answer is the same; only the work
            differs (with precision="bf16" the bounds cover fp32 rounding only, so
            pruned and full bf16 sweeps may pick different keys, both within bf16 error
            of the optimum).
        hint: optional int64 (N,) or (B, N) key indices, per query a key that is likely
            a good answer. The pruned search starts each query's threshold at that key's
            score, so fewer keys are computed; the answer does not depend on it (the full
            sweeps have no threshold to start and do not need it).

    Returns:
        int64 indices into the keys, (N,) or (B, N).
    """
    _validate.point_sets(queries, keys)
    if keys.shape[-2] == 0:
        raise ValueError("keys is empty (0 patches)")
    alpha = _validate.alpha(alpha)
    _validate.precision(precision)
    be = _backend.resolve(backend, queries.device, precision)
    squeeze = queries.dim() == 2
    q3 = queries.unsqueeze(0) if squeeze else queries
    h2 = None if hint is None else _validate.hint(hint, q3, keys.shape[-2], squeeze)
    k3 = keys.unsqueeze(0) if keys.dim() == 2 else keys
    if not (be == "cpp" and prune and alpha is not None):
        idx = patch_nn_sweep(q3, k3, alpha, be, precision)
        return idx[0] if squeeze else idx
    q3, k3, alpha = unit_scaled(q3, k3, alpha, be)
    if alpha is None:   # alpha left fp32's range beside the scaled data: the plain nearest key
        idx = patch_nn_sweep(q3, k3, alpha, be, precision)
        return idx[0] if squeeze else idx
    if keys.dim() == 2:
        idx = PatchIndex(k3[0], alpha, backend=be, precision=precision, incremental=False).search(q3, h2)
    else:  # a key set per batch element
        idx = torch.cat([PatchIndex(k3[b], alpha, backend=be, precision=precision, incremental=False)
                         .search(q3[b:b + 1], None if h2 is None else h2[b:b + 1])
                         for b in range(q3.shape[0])])
    return idx[0] if squeeze else idx


if _ext.CPP_AVAILABLE:
    @torch.library.register_fake("fastgen::patch_nn")
    def _patch_nn_fake(queries, keys, alpha, precision):
        _validate.fake_point_sets(queries, keys)
        _validate.precision(precision)
        if keys.shape[1] == 0:
            raise ValueError("keys is empty (0 patches)")
        return queries.new_empty(queries.shape[:2], dtype=torch.long)
