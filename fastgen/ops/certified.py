"""Exact answers from a bf16 screen on the Triton backend (knn, nearest_code and
patch_nn with precision="bf16"; knn and nearest_code with precision="fp32" and k <= 128,
and patch_nn without alpha, start at the fp32 screen of step 3): what the CPU's certified mode does
(csrc/engine/reductions.h, CertifiedTopK), for tiles whose cross term runs on bf16
tensor cores.

1. The screen (fastgen/ops/triton/screen.py) keeps, per query row, the KC smallest lower
   bounds L_j = s~_j - E_j of the keys' scores, E_j the proven error bound (with the
   largest key norm of j's tile of keys).
2. Upper bounds are L_j + 2 E_j; the k-th smallest of them, U, bounds the true k-th best
   score from above, so only keys with L_j <= U can be among the k best: those are
   re-ranked in float64 on direct differences (ties to the lowest index).
3. A row whose KC kept bounds are all <= U may have dropped a candidate (near-duplicate
   keys, everything tied): it is screened again with fp32 dots (a window ~2^-16 of
   bf16's), then (unweighted screens) with fp32 dots and 256 slots, and what still
   overflows is answered by a float64 sweep over all its keys.
The result is the float64 reference's, bit for bit in the indices; a window smaller than
the bound's is caught by the tests (tests/test_certified.py, a mutant).
"""
import torch
import triton

from fastgen.ops import error_bound
from fastgen.ops.baselines import centering_shift
from fastgen.ops.knn_plan import SCREEN_MAX_K
from fastgen.ops.triton.screen import screen_blocks, screen_triton   # only imported where triton is

# candidate slots per row: at least this many, and twice k
MIN_SLOTS = 16
MAX_K = SCREEN_MAX_K     # slots up to 256: what fastgen/gpu_plan.py compiles
BUDGET = 1 << 24   # float64 elements per chunk of the exact re-rank and of the fallback sweep
FP32_SAFE = 2.0 ** 126   # half of fp32's range: what a row's intermediates must stay below


def slots(k):
    return triton.next_power_of_2(max(MIN_SLOTS, 2 * k))


# slots of the last screen before the sweep, the most compiled (256): on noisy copies of a
# photo's own patches ~7-8 % of rows overflow 16 fp32 slots, 0.02 % 64, none 256
# (benchmarks/screen_stats.py's emulation; one draw of the noise)
WIDE_SLOTS = slots(MAX_K)


def bound(dim, *, weighted=False, fp32=False):
    """(coef, slack) of the screen's E (fastgen.ops.error_bound): bf16 inputs and
    tensor-core sums, or (fp32=True, the second stage) fp32 inputs and "ieee" fp32 sums."""
    if fp32:
        coef = error_bound.coefficient(dim, 0.0, full_distance=weighted, weighted=weighted)
    else:
        coef = error_bound.coefficient(dim, error_bound.BF16, accumulation_roundoff=error_bound.TENSOR_CORE_ACC,
                                       full_distance=weighted, weighted=weighted)
    return coef, error_bound.slack(dim)


def knn_screened(queries, keys, k, exclude_self, fp32=False):
    """Exact (dist, idx) (B, N, k) of knn on (B, N, D) / (B, M, D) from the bf16 screen
    (fp32=True: from the fp32 screen alone, precision="fp32"): dist float32 of the float64
    squared distance, ascending; ties to the lowest index."""
    if k > MAX_K:
        raise ValueError(f"precision={'fp32' if fp32 else 'bf16'!r} screens on the triton backend support "
                         f"k <= {MAX_K}, got k={k}")
    dist, idx = _search(queries, keys, k, None, exclude_self, fp32)
    return dist.float(), idx


def patch_nn_screened(queries, keys, alpha):
    """patch_nn's exact float64 answer (B, N) on (B, N, D) / (B, M, D) from bf16 screens:
    the column minima are knn of the keys among the queries (k = 1, screened), then the
    normalised argmin d_ij / (alpha + colmin_j) is screened with weights."""
    B, N, D = queries.shape
    if B * N == 0:
        return torch.zeros((B, N), dtype=torch.long, device=queries.device)
    if alpha is None:
        return knn_screened(queries, keys, 1, False)[1][..., 0]
    colmin = _search(keys, queries, 1, None, False)[0][..., 0]   # (B, M) float64: the keys' nearest queries
    den = alpha + colmin           # the score is d_ij / den_j, as the float64 reference divides
    return _search(queries, keys, 1, den, False)[1][..., 0]


# Rows answered by each stage since the process started (or reset_stats()), and the keys
# re-ranked in float64 (benchmarks/screen_stats.py). fp32_rows: rows screened with fp32
# dots -- with precision="bf16" the rows its screen left over, with "fp32" every row;
# wide_rows: rows screened again with WIDE_SLOTS slots; swept_rows: rows swept in float64.
STATS = {"rows": 0, "fp32_rows": 0, "wide_rows": 0, "swept_rows": 0, "candidates": 0}


def reset_stats():
    for key in STATS:
        STATS[key] = 0


def _search(queries, keys, k, den, exclude_self, fp32=False):
    """The stages: the bf16 screen for every row; the rows whose slots overflowed
    (near-duplicate keys: bf16's window holds hundreds of keys on image patches) again
    with fp32 dots, whose window is ~2^-16 of bf16's; what still overflows once more with
    fp32 dots and WIDE_SLOTS slots (unweighted screens: flat image regions hold tens of
    near-identical keys even in fp32's window); the float64 sweep for what is left.
    fp32=True (precision="fp32") starts at the fp32 screen. Each stage is exact where it
    answers, so the result is the float64 reference's: (float64 scores, idx), (B, N, k) each."""
    B, N, D = queries.shape
    if B * N == 0:
        return torch.empty((B, N, k), device=queries.device), torch.empty((B, N, k), dtype=torch.long, device=queries.device)
    w = None if den is None else den.reciprocal().float().contiguous()
    kc = slots(k)
    coef, slack = bound(D, weighted=den is not None, fp32=fp32)
    lower, idx = screen_triton(queries, keys, w, kc, exclude_self, coef, slack, fp32)
    out_d, out_i, redo, pending = _rerank(queries, keys, lower, idx, k, coef, slack, den)
    STATS["rows"] += B * N
    if fp32:
        STATS["fp32_rows"] += B * N
    elif pending:
        pending = _rescreen(queries, keys, k, den, w, kc, exclude_self, redo, out_d, out_i, "fp32_rows")
    if pending and den is None and kc < WIDE_SLOTS:
        pending = _rescreen(queries, keys, k, den, w, WIDE_SLOTS, exclude_self, redo, out_d, out_i, "wide_rows")
    if pending:
        STATS["swept_rows"] += pending
        _sweep_rows(queries, keys, k, den, exclude_self, redo, out_d, out_i)
    return out_d, out_i


def _rescreen(queries, keys, k, den, w, kc, exclude_self, redo, out_d, out_i, stat):
    """The rows flagged in `redo` screened again with fp32 dots and kc slots, per batch
    element; what they settle is written into out_d / out_i and cleared from redo.
    Returns the rows still flagged. With exclude_self (the kernel excludes by row position,
    which a subset of rows breaks) the rows are screened for k + 1 neighbours with self
    included and self dropped after: the k best others are among the k + 1 best of all."""
    kk = k + 1 if exclude_self else k
    kc = max(kc, slots(kk))
    if kc > WIDE_SLOTS:
        return int(redo.sum())
    coef, slack = bound(queries.shape[-1], weighted=den is not None, fp32=True)
    pending = 0
    for b in range(queries.shape[0]):
        rows = redo[b].nonzero()[:, 0]
        if rows.numel() == 0:
            continue
        q_b, k_b = queries[b, rows][None], keys[b:b + 1]
        d_b = None if den is None else den[b:b + 1]
        lower, idx = screen_triton(q_b, k_b, None if w is None else w[b:b + 1], kc, False, coef, slack, True)
        d2, i2, r2, left = _rerank(q_b, k_b, lower, idx, kk, coef, slack, d_b)
        if exclude_self:
            # self moved behind the others (a stable sort keeps their order), then cut
            order = (i2[0] == rows[:, None]).to(torch.int8).argsort(dim=-1, stable=True)[:, :k]
            d2, i2 = torch.gather(d2[0], -1, order)[None], torch.gather(i2[0], -1, order)[None]
        out_d[b, rows], out_i[b, rows], redo[b, rows] = d2[0], i2[0], r2[0]
        STATS[stat] += rows.numel()
        pending += left
    return pending


def _exact_sqdist(queries, keys, idx):
    """float64 sum((q - k_idx)^2) (B, N, S) for key indices idx (B, N, S), in chunks of
    rows of all batch elements at once (IMLE's batched searches: B in the hundreds, N = 1)."""
    B, N, S = idx.shape
    D = queries.shape[-1]
    out = torch.empty((B * N, S), dtype=torch.float64, device=queries.device)
    q_all, i_all = queries.reshape(B * N, D), idx.reshape(B * N, S)
    b_all = torch.arange(B, device=queries.device).repeat_interleave(N)
    step = max(1, BUDGET // max(1, S * D))
    for r in range(0, B * N, step):
        q = q_all[r:r + step].double()
        kk = keys[b_all[r:r + step, None], i_all[r:r + step]].double()     # (rows, S, D)
        out[r:r + step] = (q[:, None, :] - kk).square().sum(-1)
    return out.view(B, N, S)


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
    # fp32 overflow in the kernel: a key whose bound became -inf looks like an empty slot,
    # one whose bound became +inf never enters a slot. Every intermediate of a row is at
    # most 4 (||q|| + max ||k||)^2 max(1, w) in size: rows where that can pass fp32's range
    # go to the float64 sweep, as do rows holding a non-finite bound of a real key; weights
    # below fp32's normal range (den > 1e37) could be flushed to zero on a GPU.
    reach = 4 * (a + bk.amax(-1, keepdim=True)) ** 2
    if den is not None:
        reach = reach * den.reciprocal().amax(-1, keepdim=True).clamp(min=1.0)
        redo = redo | (den.amax(-1, keepdim=True) > 1e37)
    redo = redo | (reach >= FP32_SAFE) | ((idx < M) & ~torch.isfinite(lower)).any(-1)
    return safe, cand, redo


def _rerank(queries, keys, lower, idx, k, coef, slack, den):
    """Step 2 of the module's docstring: (dist float64, idx) (B, N, k) from the candidates,
    exact except in the rows of `redo` (B, N), which the caller answers otherwise, and
    how many those are; for weighted screens (den given: score d_ij / den_j) dist is the
    float64 score."""
    B, N, D = queries.shape
    M = keys.shape[1]
    safe, cand, redo = candidates(queries, keys, lower, idx, k, coef, slack, den)
    # one device-to-host copy for both counts (the caller needs the rows left anyway)
    n_cand, pending = torch.stack([cand.sum(), redo.sum()]).tolist()
    STATS["candidates"] += n_cand
    score = _exact_sqdist(queries, keys, safe)
    if den is not None:
        score = score / torch.gather(den, 1, safe.view(B, -1)).view(safe.shape)
    score = score.masked_fill(~cand, torch.inf)
    # rank by (score, index): index order first, then a stable sort by score
    order = safe.masked_fill(~cand, M).argsort(-1)
    safe, score = torch.gather(safe, -1, order), torch.gather(score, -1, order)
    score, order = torch.sort(score, dim=-1, stable=True)
    return score[..., :k].contiguous(), torch.gather(safe, -1, order)[..., :k].contiguous(), redo, pending


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
