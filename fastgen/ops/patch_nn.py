"""fastgen.ops.patch_nn: GPNN's normalised patch nearest neighbour, no N x M matrix."""
import torch

from fastgen import _ext
from fastgen.ops import _backend, _validate, reference


def patch_nn(queries, keys, alpha=0.005, *, backend="auto", precision="fp32"):
    """For every query patch, the key patch minimising ||q - k||^2 / (alpha + min_q' ||q' - k||^2).

    The denominator is how well key k is already covered by the closest query; dividing
    by it steers queries towards keys nobody uses yet, which is what keeps GPNN's
    outputs from collapsing onto a few source patches (Granot et al., CVPR 2022).

    Args:
        queries: (N, D) or (B, N, D) flattened patches, float32/float16/bfloat16.
        keys: (M, D) or (B, M, D), same dtype and device.
        alpha: > 0, small = strong push to use every key (0.005 for sampling); None
            gives the plain (exact) nearest neighbour.
        backend: "auto", "cpp", or "torch" (the two-pass chunked PyTorch method).
        precision: "fp32" or "bf16" cross term. Scores are fp32: natural patches are
            full of near-ties, so different backends may pick different keys of
            (within fp32 rounding) equal score.

    Returns:
        int64 indices, (N,) or (B, N).
    """
    _validate.point_sets(queries, keys)
    if keys.shape[-2] == 0:
        raise ValueError("keys is empty (0 patches)")
    if alpha is not None:
        alpha = float(alpha)
        # float32 weights 1 / (alpha + colmin) must neither overflow nor vanish
        if not (1e-30 <= alpha <= 1e30):
            raise ValueError(f"alpha must be in [1e-30, 1e30] or None, got {alpha}")
    _validate.precision(precision)
    be = _backend.resolve(backend, queries.device)
    if be == "triton":
        raise NotImplementedError("patch_nn has no Triton kernel yet; use backend='torch' on CUDA tensors")
    squeeze = queries.dim() == 2
    q3 = queries.unsqueeze(0) if squeeze else queries
    k3 = keys.unsqueeze(0) if squeeze else keys
    if be == "cpp":
        idx = torch.ops.fastgen.patch_nn(q3.contiguous(), k3.contiguous(), alpha, precision)
    else:
        _validate.finite(queries, "queries")
        _validate.finite(keys, "keys")
        idx = torch.stack([reference.patch_nn_two_pass(q3[b], k3[b], alpha) for b in range(q3.shape[0])])
    return idx[0] if squeeze else idx


if _ext.CPP_AVAILABLE:
    @torch.library.register_fake("fastgen::patch_nn")
    def _patch_nn_fake(queries, keys, alpha, precision):
        _validate.one_device(queries=queries, keys=keys)
        return queries.new_empty(queries.shape[:2], dtype=torch.long)
