"""fastgen.ops.knn: exact k nearest neighbours (squared L2), no N x M matrix."""
import contextlib
import contextvars
import numbers
from typing import NamedTuple

import torch

from fastgen import _ext
from fastgen.ops import _backend, _validate, baselines, error_bound
from fastgen.ops._sqdist_grad import sqdist_backward


class Neighbours(NamedTuple):
    """knn's result: (dist, idx), as faiss and pytorch3d order them."""
    dist: torch.Tensor  # (..., N, k) float32 squared distances, ascending
    idx: torch.Tensor   # (..., N, k) int64 key indices


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
            into balls, triangle-inequality bounds: fastgen/ops/pruned_knn.py). Same
            answer, bit for bit. None (default) is the automatic choice, which is the
            sweep: on benchmarks/bench_knn_zoo.py's cases (patches, Gaussians,
            mixtures, digits) the pruned path was slower than the sweep on every one.
            True forces it where supported (2-D, cpp, no exclude_self; elsewhere it
            raises), False never.

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
    _validate.precision(precision)
    be = _backend.resolve(backend, queries.device, precision)
    if be != "cpp":  # the C++ op checks the same inside its first pass over the data
        _validate.distance_inputs(queries, "queries", keys, "keys")

    _validate.flag(prune, "prune")
    prunable = be == "cpp" and queries.dim() == 2 and not exclude_self
    if prune and not prunable:
        raise ValueError("prune=True needs 2-D queries and keys on the cpp backend without exclude_self "
                         f"(got {queries.dim()}-D on backend {be!r}, exclude_self={exclude_self}); "
                         "use prune=None or False")
    if prune:
        # prune=None is the sweep: the pruned path was slower on every case of
        # benchmarks/bench_knn_zoo.py (fastgen/ops/pruned_knn.py)
        from fastgen.ops import pruned_knn
        _validate.distance_inputs(queries, "queries", keys, "keys")
        with torch.no_grad():
            dist, idx = pruned_knn.pruned_knn(queries, keys, k, precision=precision)[0]
        if torch.is_grad_enabled() and (queries.requires_grad or keys.requires_grad):
            # the gradient of sum((q - k)^2), the values of the certified kernel: g - g is
            # exactly 0, so dist stays the sweep's bit for bit
            g = baselines.gather_sqdist(queries[None], keys[None], idx[None])[0]
            dist = dist + (g - g.detach())
        return Neighbours(dist, idx)

    if precision == "bf16" and be == "cpp" and not bf16_pays(queries, keys, k):
        precision = "fp32"

    squeeze = queries.dim() == 2
    q3 = queries.unsqueeze(0) if squeeze else queries
    k3 = keys.unsqueeze(0) if squeeze else keys
    if be == "cpp":
        dist, idx = torch.ops.fastgen.knn(q3.contiguous(), k3.contiguous(), k, exclude_self, precision)
    else:
        # bf16, and fp32 with k <= SCREEN_MAX_K: screens re-ranked in float64 (exact)
        screened = be == "triton" and (precision == "bf16" or k <= SCREEN_MAX_K)
        if screened:
            from fastgen.ops.certified import knn_screened
            with torch.no_grad():        # the gradient comes from gather_sqdist below
                dist, idx = knn_screened(q3, k3, k, exclude_self, fp32=precision == "fp32")
        elif be == "triton":                            # larger k: ranked in fp32
            from fastgen.ops.triton.knn import knn_triton
            dist, idx = knn_triton(q3, k3, k, exclude_self)
        else:
            dist, idx = baselines.knn_addmm(q3, k3, k, exclude_self, stable_ties=True)
        if torch.is_grad_enabled() and (queries.requires_grad or keys.requires_grad):
            g = baselines.gather_sqdist(q3, k3, idx)
            # the screens' values are fl32 of the float64 distances, in order: keep them
            # (g - g is exactly 0) and take the gradient of sum((q - k)^2)
            dist = dist + (g - g.detach()) if screened else g
    if squeeze:
        return Neighbours(dist[0], idx[0])
    return Neighbours(dist, idx)


# bf16's error bound is ~2^-8 of the squared norms: on near-duplicate data (image
# patches) hundreds of keys per row fall inside it and are re-ranked in float64 one by
# one, which costs more than the faster GEMM saves (measured: flower.jpg vs china.jpg 6x6x3
# patches, k=5, bf16 1.8x slower than fp32 before this check).
_BF16_SAMPLE = 64

# the largest k the Triton screen serves (slots up to 256: what fastgen/gpu_plan.py compiles);
# here rather than in fastgen/ops/certified.py, which imports triton
SCREEN_MAX_K = 128


def _bf16_window(a, b, d):
    """2 E(a, b) with bf16 inputs (fastgen/ops/error_bound.py): how far apart two keys'
    bf16 tile values may be and still swap places (a decision, not a proof: the kernel
    uses its own bound)."""
    return 2 * error_bound.coefficient(d, error_bound.BF16) * (a + b) ** 2


_BF16_WARNED = set()      # the reasons already warned about (once each per process)
# set by bf16_decided(): a caller that ran bf16_pays once for a series of similar calls
_BF16_DECIDED = contextvars.ContextVar("fastgen_bf16_decided", default=False)


@contextlib.contextmanager
def bf16_decided():
    """Within this block knn runs precision="bf16" as asked, without its sample: for a
    caller (StreamingKNN) that checked bf16_pays once for a series of similar searches."""
    token = _BF16_DECIDED.set(True)
    try:
        yield
    finally:
        _BF16_DECIDED.reset(token)


def bf16_pays(queries, keys, k):
    """Whether precision="bf16" is worth it for this knn: a sample of 64 queries estimates
    how many keys per row would fall inside bf16's error window of the k-th neighbour
    (each is re-ranked in float64); past max(16, min(256, M / 200)) the fp32 sweep is
    faster. Below D=96 the bf16 GEMM itself does not pay (measured). Small problems
    (< 2^28 multiply-adds) keep bf16 as asked. When it says no, knn runs fp32 and warns
    once per process and reason."""
    n, m, d = queries.shape[-2], keys.shape[-2], queries.shape[-1]
    batch = queries.shape[0] if queries.dim() == 3 else 1
    if _BF16_DECIDED.get() or batch * n * m * d < (1 << 28) or m <= k + 1:
        return True
    if d < 96:
        # measured (benchmarks/RESULTS.md, knn_data and knn): at D=64 the bf16 GEMM is not
        # faster than fp32's on these machines, and its wider bound adds re-ranking
        return _fall_back("shallow", f"D={d} is too shallow for the bf16 GEMM to pay")
    q = queries.reshape(-1, d)
    g = torch.Generator().manual_seed(0)
    sample = q[torch.randint(q.shape[0], (_BF16_SAMPLE,), generator=g).to(q.device)]
    kk = keys.reshape(-1, d) if keys.dim() == 3 else keys
    limit = max(16, min(256, m // 200))
    near = knn(sample, kk, min(m, k + limit), precision="fp32", prune=False)
    mu = baselines.centering_shift(kk)
    a = (sample.float() - mu).norm(dim=1, keepdim=True)
    b = (kk[near.idx].float() - mu).norm(dim=-1)
    kth = near.dist[:, k - 1:k]
    inside = (near.dist - kth <= _bf16_window(a, b, d)).sum(1).float().mean()
    if float(inside) - k <= limit / 2:
        return True
    return _fall_back("re-rank", f"it would re-rank ~{float(inside):.0f} keys per query in float64 on this data "
                      "(near-duplicates inside bf16's error bound)")


def _fall_back(kind, why):
    if kind not in _BF16_WARNED:
        import warnings
        warnings.warn(f"knn: precision='bf16' runs fp32 instead: {why}; fp32 is faster here", stacklevel=4)
        _BF16_WARNED.add(kind)
    return False


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
