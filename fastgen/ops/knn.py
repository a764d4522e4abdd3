"""fastgen.ops.knn: exact k nearest neighbours (squared L2), no N x M matrix."""
import numbers

import torch

from fastgen import _ext
from fastgen.ops import _validate, baselines, pruned_knn
from fastgen.ops._sqdist_grad import sqdist_backward
from fastgen.ops.knn_plan import SCREEN_MAX_K, KnnPlan, bf16_pays, plan_knn  # noqa: F401 (public names)
from fastgen.ops.knn_sweep import Neighbours, run_sweep
from fastgen.threads import fine_grained_threads


def knn(queries, keys, k=1, exclude_self=False, *, backend="auto", precision="fp32", prune=None):
    """The `k` nearest keys of every query by squared Euclidean distance.

    Args:
        queries: (N, D) or batched (B, N, D), float32/float16/bfloat16.
        keys: (M, D) or (B, M, D), same dtype and device as `queries`.
        k: neighbours per query, 1 <= k <= M (M - 1 with `exclude_self`).
        exclude_self: queries and keys are the same set; drop key i for query i
            (by index, not by distance, so duplicates of i still count).
        backend: "auto" (cpp on CPU, triton on CUDA), "cpp", "triton" or "torch".
        precision: "fp32", or "bf16" to run the cross term on bf16 inputs (cpp and
            triton backends; torch raises rather than ignore it). bf16 is exact on both:
            candidates within a proven error bound of the k-th best are re-ranked in
            float64, so it returns the float64 ranking (on triton: bf16 tensor cores on
            a GPU, k <= 128, fastgen/ops/certified.py). fp32 is exact on cpp, and on
            triton for k <= 128 (an fp32 screen, re-ranked in float64; larger k ranks
            in fp32); torch ranks in fp32.
        prune: skip keys that provably cannot be among a query's k nearest (keys grouped
            into k-means balls, triangle-inequality bounds per row, one C++ pass:
            fastgen/ops/pruned_knn.py). Same answer, bit for bit. None (default) is the
            automatic choice (fastgen.ops.knn_plan.prune_pays): pruned for 2-D cpp
            searches with N >= M / 8 queries, M >= 4096 keys, N M D >= 2^28 and
            structure in the data (a 32-query sample), else the sweep. True forces it where supported
            (2-D, cpp, no exclude_self; elsewhere it raises), False never.

    Returns:
        Neighbours(dist, idx): float32 squared distances sorted ascending, computed directly
        as sum((q - k)^2) (no cancellation), and int64 indices; shape (N, k) or
        (B, N, k). Ties go to the lowest index. `dist` is differentiable w.r.t.
        queries and keys.
    """
    _validate.point_sets(queries, keys)
    # any integer type (numpy's int64 from an array, a 0-d integer tensor), never bool/float
    if isinstance(k, torch.Tensor) and k.dim() == 0 and not k.is_floating_point() and k.dtype != torch.bool:
        k = int(k)
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    k = int(k)
    n, m = queries.shape[-2], keys.shape[-2]
    if exclude_self and n != m:
        raise ValueError(f"exclude_self needs queries and keys to be the same set (N == M), got N={n}, M={m}")
    available = m - (1 if exclude_self else 0)
    if k < 1 or k > available:
        raise ValueError(f"k must be in [1, {available}] (keys has M={m}"
                         f"{', self excluded' if exclude_self else ''}), got k={k}")
    plan = plan_knn(queries, keys, k, exclude_self=exclude_self, backend=backend, precision=precision,
                    prune=prune)
    if plan.prune:
        # the pruned call is short regions throughout: on a busy machine one thread
        # (fastgen.threads) checks its inputs faster than two
        with fine_grained_threads():
            _validate.distance_inputs(queries, "queries", keys, "keys")
    elif plan.backend != "cpp":  # the C++ sweep checks the same in its first pass
        _validate.distance_inputs(queries, "queries", keys, "keys")
    return run_knn(queries, keys, k, exclude_self, plan)


def run_knn(queries, keys, k, exclude_self, plan):
    """knn by a plan from fastgen.ops.knn_plan, on inputs already validated (for callers
    that plan once: StreamingKNN)."""
    if plan.prune:
        with torch.no_grad():
            dist, idx = pruned_knn.pruned_knn(queries, keys, k, precision=plan.precision, checked=True)[0]
        if torch.is_grad_enabled() and (queries.requires_grad or keys.requires_grad):
            # the gradient of sum((q - k)^2), the values of the certified kernel: g - g is
            # exactly 0, so dist stays the sweep's bit for bit
            g = baselines.gather_sqdist(queries[None], keys[None], idx[None])[0]
            dist = dist + (g - g.detach())
        return Neighbours(dist, idx)

    return run_sweep(queries, keys, k, exclude_self, plan)


if _ext.CPP_AVAILABLE:
    @torch.library.register_fake("fastgen::knn")
    def _knn_fake(queries, keys, k, exclude_self, precision):
        _validate.fake_point_sets(queries, keys)
        _validate.precision(precision)
        available = keys.shape[1] - (1 if exclude_self else 0)
        if exclude_self and queries.shape[1] != keys.shape[1]:
            raise ValueError("exclude_self needs queries and keys to be the same set (N == M)")
        if not 1 <= k <= available:
            raise ValueError(f"k must be in [1, {available}], got k={k}")
        B, N, _ = queries.shape
        return (queries.new_empty((B, N, k), dtype=torch.float32),
                queries.new_empty((B, N, k), dtype=torch.long))

    def _knn_setup_context(ctx, inputs, output):
        queries, keys, _, _, _ = inputs
        ctx.save_for_backward(queries, keys, output[1])
        ctx.mark_non_differentiable(output[1])  # indices carry no gradient

    def _knn_backward(ctx, grad_dist, grad_idx):
        queries, keys, idx = ctx.saved_tensors
        gq, gk = sqdist_backward(queries, keys, idx, grad_dist,
                                 ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return gq, gk, None, None, None

    torch.library.register_autograd("fastgen::knn", _knn_backward, setup_context=_knn_setup_context)
