"""fastgen.ops.knn_plan: the one place that decides how an exact kNN search runs.

`plan_knn` takes the inputs (their shapes, dtype, device, a sample of the data for the
bf16 check), k and what the caller asked for, and returns a KnnPlan: the backend, prune
or sweep, the precision that actually runs and the kernel. `knn` plans every call;
`StreamingKNN` plans once, on its first full chunk, and keeps the plan for every chunk
after, so the answer and the cost do not change from chunk to chunk.
"""
import warnings
from dataclasses import dataclass

import torch

from fastgen.ops import _backend, _validate, baselines, error_bound
from fastgen.threads import fine_grained_threads

# the largest k the Triton screen serves (slots up to 256: what fastgen/gpu_plan.py compiles)
SCREEN_MAX_K = 128

# bf16's error bound is ~2^-8 of the squared norms: on near-duplicate data (image
# patches) hundreds of keys per row fall inside it and are re-ranked in float64 one by
# one, which costs more than the faster GEMM saves (measured: flower.jpg vs china.jpg 6x6x3
# patches, k=5, bf16 1.8x slower than fp32 before this check).
_BF16_SAMPLE = 64
_BF16_WARNED = set()      # the reasons already warned about (once each per process)


@dataclass(frozen=True)
class KnnPlan:
    """How one exact kNN search runs.

    backend: "cpp", "triton" or "torch" (resolved, never "auto").
    prune: the pruned path (cpp, 2-D, no exclude_self) instead of the sweep (asked for,
        or prune=None and prune_pays).
    precision: the precision that runs ("bf16" asked may run "fp32": bf16_pays).
    kernel: "pruned", "certified-sweep" (cpp), "screened" (triton, re-ranked in float64),
        "fp32-tiles" (triton, k > SCREEN_MAX_K) or "addmm" (torch).
    """
    backend: str
    prune: bool
    precision: str
    kernel: str


def plan_knn(queries, keys, k, *, exclude_self=False, backend="auto", precision="fp32", prune=None,
             streamed=False):
    """The plan for knn(queries, keys, k, ...); raises ValueError naming the argument that
    makes the request impossible. `keys` may be the first chunk of a stream
    (`streamed=True`): its size says nothing about the whole search's, so bf16 is then
    judged by the sample even where one call of this size would keep it unchecked."""
    _validate.precision(precision)
    _validate.flag(prune, "prune")
    be = _backend.resolve(backend, queries.device, precision)
    prunable = be == "cpp" and queries.dim() == 2 and not exclude_self
    if prune and not prunable:
        raise ValueError("prune=True needs 2-D queries and keys on the cpp backend without exclude_self "
                         f"(got {queries.dim()}-D on backend {be!r}, exclude_self={exclude_self}); "
                         "use prune=None or False")
    # a stream's chunks are searched with a bound and a fresh index each, which prune_pays
    # was not tuned on (it times single calls): streams prune only when asked
    pruned = bool(prune) if prune is not None else prunable and not streamed and prune_pays(queries, keys, k)
    # (the pruned path re-ranks the same windows: the same check)
    if precision == "bf16" and be == "cpp" and not bf16_pays(queries, keys, k, streamed):
        precision = "fp32"
    if pruned:
        kernel = "pruned"
    elif be == "cpp":
        kernel = "certified-sweep"
    elif be == "triton":
        kernel = "screened" if precision == "bf16" or k <= SCREEN_MAX_K else "fp32-tiles"
    else:
        kernel = "addmm"
    return KnnPlan(be, pruned, precision, kernel)


# When the pruned path pays (tuned on the "tune" half of benchmarks/bench_knn_zoo.py,
# reported on the other and on cases neither half holds, benchmarks/RESULTS.md). Its index
# (one k-means assignment of the keys to M/128 centres, ~M^2 D / 128 multiply-adds,
# measured at ~0.035 M/N of a sweep) is built per call, so it needs queries enough to pay
# that back (N >= M/8: at most ~0.3 of a sweep). The bounds need structure: a query's
# k-th neighbour much nearer than it would be in i.i.d. data of the same size and
# dimension (relative_structure < 0.7), or much nearer than a typical key at all
# (structure_ratio < 0.1: in 4 dimensions even uniform noise prunes, 2.6x faster).
# Gaussians (0.78-0.88 at D = 8..128), an untrained generator's samples (1.1) lose 2-3x;
# image patches (0.00-0.49) and clustered features (0.22-0.38) win up to 4x.
PRUNE_MIN_QUERY_SHARE = 0.125    # N >= M / 8
PRUNE_MIN_KEYS = 4096
PRUNE_MIN_WORK = 1 << 28         # N M D: below this the sweep takes milliseconds
PRUNE_MAX_RELATIVE_STRUCTURE = 0.7
PRUNE_NEAR_RATIO = 0.1


def prune_pays(queries, keys, k):
    """Whether knn(prune=None) takes the pruned path for (N, D) x (M, D) cpp inputs: many
    queries per key, a large problem, and structure (on a 32-query sample, one (32 x M)
    GEMM, run only if the rest holds)."""
    n, m, d = queries.shape[0], keys.shape[0], queries.shape[1]
    if n < PRUNE_MIN_QUERY_SHARE * m or m < PRUNE_MIN_KEYS or n * m * d < PRUNE_MIN_WORK:
        return False
    with fine_grained_threads():      # one short GEMM: on a busy machine one thread is faster
        ratio = structure_ratio(queries, keys, k)
    return ratio < PRUNE_NEAR_RATIO or ratio / _iid_ratio(k, m, d) < PRUNE_MAX_RELATIVE_STRUCTURE


def _iid_ratio(k, m, d):
    # the k-th of M neighbours sits at the (k/M)-quantile of the distances, and that
    # quantile's radius scales as (k/M)^(1/D)
    return (min(k, m) / m) ** (1.0 / max(d, 1))


def relative_structure(queries, keys, k=1, sample=32, seed=0):
    """structure_ratio divided by (k / M)^(1/D), about what it is for i.i.d. data of the
    same size and dimension: ~0.8-1.1 for noise at any D, well under 0.7 where the
    bounds can skip keys. Without the correction a low dimension alone looks structured
    (Gaussians at D = 8 give a raw ratio of 0.22, and lose 2.4x pruned)."""
    return structure_ratio(queries, keys, k, sample, seed) / _iid_ratio(k, keys.shape[0], keys.shape[1])


def structure_ratio(queries, keys, k=1, sample=32, seed=0):
    """sqrt(k-th distance / median distance to a key) over a sample of (N, D) queries
    against (M, D) keys: how far a query's neighbourhood is, relative to the data's
    scale. ~1 for uniform high-dimensional data (nothing to prune), well under 1/2 for
    structured data. Costs one (sample x M) fp32 GEMM: a heuristic needs no certified
    distances (their operand preparation cost knn(prune=None) twice as much)."""
    g = torch.Generator().manual_seed(seed)
    n, m = queries.shape[0], keys.shape[0]
    qs = queries[torch.randperm(n, generator=g)[:sample].to(queries.device)].float()
    kf = keys.float()
    with torch.no_grad():
        # ||q||^2 + ||k||^2 - 2 q.k: cancellation can only make near neighbours look nearer
        sq = torch.addmm(torch.linalg.vector_norm(kf, dim=1).square_(), qs, kf.t(), alpha=-2).add_(qs.square().sum(1, keepdim=True))
        near = sq.topk(min(k, m), dim=1, largest=False).values[:, -1].double().clamp_min(0)
    ks = keys[torch.randint(m, (qs.shape[0],), generator=g).to(keys.device)]
    typical = (qs.double() - ks.double()).square().sum(1)
    return float((near.median() / typical.median().clamp_min(1e-300)).sqrt())


def _bf16_window(a, b, d):
    """2 E(a, b) with bf16 inputs (fastgen/ops/error_bound.py): how far apart two keys'
    bf16 tile values may be and still swap places (a decision, not a proof: the kernel
    uses its own bound)."""
    return 2 * error_bound.coefficient(d, error_bound.BF16) * (a + b) ** 2


def bf16_pays(queries, keys, k, streamed=False):
    """Whether precision="bf16" is worth it for this cpp knn: a sample of 64 queries
    estimates how many keys per row would fall inside bf16's error window of the k-th
    neighbour (each is re-ranked in float64); past max(16, min(256, M / 200)) the fp32
    sweep is faster. Below D=96 the bf16 GEMM itself does not pay (measured). Small
    problems (< 2^28 multiply-adds; not a stream's first chunk) keep bf16 as asked. When it says no, the plan runs
    fp32 and warns once per process and reason."""
    n, m, d = queries.shape[-2], keys.shape[-2], queries.shape[-1]
    batch = queries.shape[0] if queries.dim() == 3 else 1
    if (not streamed and batch * n * m * d < (1 << 28)) or m <= k + 1:
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
    with torch.no_grad():   # the cpp sweep in fp32: what the plan would run instead
        dist, idx = torch.ops.fastgen.knn(sample[None].contiguous(), kk[None].contiguous(),
                                          min(kk.shape[0], k + limit), False, "fp32")
    dist, idx = dist[0], idx[0]
    mu = baselines.centering_shift(kk)
    a = (sample.float() - mu).norm(dim=1, keepdim=True)
    b = (kk[idx].float() - mu).norm(dim=-1)
    kth = dist[:, k - 1:k]
    inside = (dist - kth <= _bf16_window(a, b, d)).sum(1).float().mean()
    if float(inside) - k <= limit / 2:
        return True
    return _fall_back("re-rank", f"it would re-rank ~{float(inside):.0f} keys per query in float64 on this data "
                      "(near-duplicates inside bf16's error bound)")


def _fall_back(kind, why):
    if kind not in _BF16_WARNED:
        warnings.warn(f"knn: precision='bf16' runs fp32 instead: {why}; fp32 is faster here", stacklevel=5)
        _BF16_WARNED.add(kind)
    return False
