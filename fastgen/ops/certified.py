"""Exact answers from a bf16 screen on the Triton backend (knn, nearest_code and
patch_nn with precision="bf16"): what the CPU's certified mode does
(csrc/engine/reductions.h, CertifiedTopK), for tiles whose cross term runs on bf16
tensor cores.

1. The screen (fastgen/ops/triton/screen.py) keeps, per query row, the KC smallest lower
   bounds L_j = s~_j - E_j of the keys' scores, E_j the proven error bound (with the
   largest key norm of j's tile of keys).
2. Upper bounds are L_j + 2 E_j; the k-th smallest of them, U, bounds the true k-th best
   score from above, so only keys with L_j <= U can be among the k best: those are
   re-ranked in float64 on direct differences (ties to the lowest index).
3. A row whose KC kept bounds are all <= U may have dropped a candidate (near-duplicate
   keys, everything tied): it is answered by a float64 sweep over all its keys, chunked.
The result is the float64 reference's, bit for bit in the indices; a window smaller than
the bound's is caught by the tests (tests/test_certified.py, a mutant).
"""
import torch
import triton

from fastgen.ops import error_bound
from fastgen.ops.baselines import centering_shift
from fastgen.ops.triton.screen import screen_blocks, screen_triton   # only imported where triton is

# candidate slots per row: at least this many, and twice k
MIN_SLOTS = 16
MAX_K = 128     # slots up to 256: what fastgen/gpu_plan.py compiles
BUDGET = 1 << 24   # float64 elements per chunk of the exact re-rank and of the fallback sweep


def slots(k):
    return triton.next_power_of_2(max(MIN_SLOTS, 2 * k))


def bound(dim, *, weighted=False):
    """(coef, slack) of the screen's E: bf16 inputs, tensor-core sums (fastgen.ops.error_bound)."""
    return (error_bound.coefficient(dim, error_bound.BF16, accumulation_roundoff=error_bound.TENSOR_CORE_ACC,
                                    full_distance=weighted, weighted=weighted),
            error_bound.slack(dim))


def knn_screened(queries, keys, k, exclude_self):
    """Exact (dist, idx) (B, N, k) of knn on (B, N, D) / (B, M, D) from the bf16 screen:
    dist float32 of the float64 squared distance, ascending; ties to the lowest index."""
    if k > MAX_K:
        raise ValueError(f"precision='bf16' on the triton backend supports k <= {MAX_K}, got k={k}")
    coef, slack = bound(queries.shape[-1])
    lower, idx = screen_triton(queries, keys, None, slots(k), exclude_self, coef, slack)
    return _rerank(queries, keys, lower, idx, k, coef, slack, None, exclude_self)


def patch_nn_screened(queries, keys, alpha):
    """patch_nn's exact float64 answer (B, N) on (B, N, D) / (B, M, D) from bf16 screens:
    the column minima are knn of the keys among the queries (k = 1, screened), then the
    normalised argmin d_ij / (alpha + colmin_j) is screened with weights."""
    B, N, D = queries.shape
    if B * N == 0:
        return torch.zeros((B, N), dtype=torch.long, device=queries.device)
    if alpha is None:
        return knn_screened(queries, keys, 1, False)[1][..., 0]
    colmin = _exact_sqdist(keys, queries, knn_screened(keys, queries, 1, False)[1])[..., 0]   # (B, M) float64
    den = alpha + colmin           # the score is d_ij / den_j, as the float64 reference divides
    coef, slack = bound(D, weighted=True)
    lower, idx = screen_triton(queries, keys, den.reciprocal().float().contiguous(), slots(1), False, coef, slack)
    return _rerank(queries, keys, lower, idx, 1, coef, slack, den, False)[1][..., 0]


def _exact_sqdist(queries, keys, idx):
    """float64 sum((q - k_idx)^2) (B, N, S) for key indices idx (B, N, S), in chunks of rows."""
    B, N, S = idx.shape
    D = queries.shape[-1]
    out = torch.empty((B, N, S), dtype=torch.float64, device=queries.device)
    step = max(1, BUDGET // max(1, S * D))
    for b in range(B):
        kb = keys[b]
        for r in range(0, N, step):
            q = queries[b, r:r + step].double()
            kk = kb[idx[b, r:r + step]].double()
            out[b, r:r + step] = (q[:, None, :] - kk).square().sum(-1)
    return out


def candidates(queries, keys, lower, idx, k, coef, slack, den=None):
    """Step 2 of the module's docstring on a screen's output (lower, idx) (B, N, KC):
    (safe, cand, redo) -- the slots' key indices (0 in empty slots), which slots hold
    candidates (B, N, KC), and which rows need the float64 sweep (B, N)."""
    B, N, D = queries.shape
    M = keys.shape[1]
    kc = idx.shape[-1]
    mu = centering_shift(keys).double()                        # the kernel's shift
    a = (queries.double() - mu[:, None, :]).norm(dim=-1)       # (B, N)
    # the kernel's E uses the largest key norm of each tile of BLOCK_M keys
    block_m = screen_blocks(D, kc)[1]
    bk = (keys.double() - mu[:, None, :]).norm(dim=-1)         # (B, M)
    pad = (-M) % block_m
    b_tile = torch.nn.functional.pad(bk, (0, pad)).view(B, -1, block_m).amax(-1)   # (B, tiles)
    valid = (idx < M) & torch.isfinite(lower)
    safe = torch.where(valid, idx, torch.zeros_like(idx))
    e = coef * (a[..., None] + torch.gather(b_tile, 1, (safe // block_m).view(B, -1)).view(B, N, kc)) ** 2 + slack
    if den is not None:   # E in units of the weight w = 1 / den (the 1e-4 below covers its rounding)
        e = e / torch.gather(den, 1, safe.view(B, -1)).view(B, N, kc)
    low = lower.double()
    upper = torch.where(valid, low + 2 * e * (1 + 1e-4), torch.inf)
    u_k = upper.kthvalue(k, dim=-1, keepdim=True).values
    cand = valid & (low <= u_k)
    # a full row (every slot holds a key) whose largest kept bound is still <= U may have
    # dropped keys below U; a non-finite U (overflowing inputs) is not trusted either
    full = valid.all(-1)
    redo = (full & (low.masked_fill(~valid, -torch.inf).max(-1).values <= u_k[..., 0])) | ~torch.isfinite(u_k[..., 0])
    return safe, cand, redo


def _rerank(queries, keys, lower, idx, k, coef, slack, den, exclude_self):
    """Steps 2 and 3 of the module's docstring: (dist float32, idx) (B, N, k), exact; for
    weighted screens (den given: score d_ij / den_j) dist is the float64 score, rounded."""
    B, N, D = queries.shape
    M = keys.shape[1]
    if B * N == 0:
        return torch.empty((B, N, k), device=queries.device), torch.empty((B, N, k), dtype=torch.long, device=queries.device)
    safe, cand, redo = candidates(queries, keys, lower, idx, k, coef, slack, den)
    score = _exact_sqdist(queries, keys, safe)
    if den is not None:
        score = score / torch.gather(den, 1, safe.view(B, -1)).view(safe.shape)
    score = score.masked_fill(~cand, torch.inf)
    # rank by (score, index): index order first, then a stable sort by score
    order = safe.masked_fill(~cand, M).argsort(-1)
    safe, score = torch.gather(safe, -1, order), torch.gather(score, -1, order)
    score, order = torch.sort(score, dim=-1, stable=True)
    out_i = torch.gather(safe, -1, order)[..., :k].contiguous()
    out_d = score[..., :k].contiguous()
    if bool(redo.any()):
        _sweep_rows(queries, keys, k, den, exclude_self, redo, out_d, out_i)
    return out_d.float(), out_i


def _sweep_rows(queries, keys, k, den, exclude_self, rows, out_d, out_i):
    """The float64 answer for the rows flagged in `rows` (B, N), over all keys, on direct
    differences as the reference, in chunks of rows: the fallback when the screen's slots
    could not hold every candidate (a slow path: rows x M x D float64 per chunk)."""
    B, N, D = queries.shape
    M = keys.shape[1]
    step = max(1, BUDGET // max(1, M * D))
    for b in range(B):
        r_all = rows[b].nonzero()[:, 0]
        k64 = keys[b].double()
        for s in range(0, r_all.numel(), step):
            r = r_all[s:s + step]
            d = (queries[b, r].double()[:, None, :] - k64[None]).square().sum(-1)
            if den is not None:
                d = d / den[b][None, :]
            if exclude_self:
                d[torch.arange(r.numel(), device=d.device), r] = torch.inf
            # ties to the lowest index: the stable sort keeps column order among equals
            v, i = torch.sort(d, dim=-1, stable=True)
            out_d[b, r], out_i[b, r] = v[:, :k], i[:, :k]
