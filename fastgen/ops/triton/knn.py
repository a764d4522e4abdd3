"""Triton backend of the squared-L2 engine: exact kNN (row top-k) and GPNN's column minimum.

Both kernels walk (BLOCK_N queries x BLOCK_M keys) tiles, build each tile as
||k||^2 - 2 q.k (plus ||q||^2 where the reduction needs it) with tl.dot over D in
BLOCK_D chunks, and reduce it while it is in registers, so the N x M matrix never
exists. The inputs are shifted by the keys' per-batch mean first (see DESIGN.md on
cancellation), and what the ops return is recomputed directly as sum((q - k)^2)
in fp32 from the indices the kernels pick.

Layout, top to bottom: the tile helper, the two kernels, the block-size choice,
the two `torch.library.triton_op`s (`fastgen::knn_triton`,
`fastgen::column_min_triton`) whose bodies are plain torch ops plus `wrap_triton`
launches, so torch.compile traces into them, then the registrations for the
interpreter and autograd.
"""
import contextlib

import torch
import triton
import triton.language as tl
from torch._subclasses.functional_tensor import FunctionalTensorMode
from triton.runtime.interpreter import InterpretedFunction
from torch.library import triton_op, wrap_triton

from fastgen.ops._sqdist_grad import sqdist_backward
from fastgen.ops.reference import gather_sqdist

# The GPU default for an fp32 tl.dot is tf32, which keeps 10 mantissa bits of each
# input: near neighbours swap and exact ties on integer data stop being ties. "ieee"
# keeps the fp32 ranking the torch backend has. (The interpreter ignores it.)
_DOT_PRECISION = "ieee"


@triton.jit
def _sqdist_tile(q_base, k_base, s_base, rows, cols, N, M, D,
                 stride_qn, stride_qd, stride_km, stride_kd, stride_sd,
                 BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """(q.k, ||q||^2, ||k||^2) of one tile, all fp32, on inputs shifted by s."""
    # int64 offsets: B * N * D can pass 2^31 long before any one index does
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    row_ok = rows < N
    col_ok = cols < M
    cross = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    q_sq = tl.zeros([BLOCK_N], dtype=tl.float32)
    k_sq = tl.zeros([BLOCK_M], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < D
        # padded D entries load 0 for both point and shift, so they add nothing
        s = tl.load(s_base + dd * stride_sd, mask=d_ok, other=0.0)
        q = tl.load(q_base + rows64[:, None] * stride_qn + dd[None, :] * stride_qd,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32) - s[None, :]
        kt = tl.load(k_base + cols64[None, :] * stride_km + dd[:, None] * stride_kd,
                     mask=d_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32) - s[:, None]
        cross = tl.dot(q, kt, cross, input_precision=DOT_PRECISION)
        q_sq += tl.sum(q * q, axis=1)
        k_sq += tl.sum(kt * kt, axis=0)
    return cross, q_sq, k_sq


@triton.jit
def _knn_kernel(q_ptr, k_ptr, shift_ptr, idx_ptr, N, M, D, K,
                stride_qb, stride_qn, stride_qd,
                stride_kb, stride_km, stride_kd,
                stride_sb, stride_sd,
                stride_ib, stride_in, stride_ik,
                KP: tl.constexpr, EXCLUDE_SELF: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    """Indices (unordered) of the K nearest keys of BLOCK_N query rows of one batch."""
    b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    q_base = q_ptr + b * stride_qb
    k_base = k_ptr + b * stride_kb
    s_base = shift_ptr + b * stride_sb
    slots = tl.arange(0, KP)
    inf = float("inf")
    if KP == 1:
        best_v = tl.full([BLOCK_N], inf, dtype=tl.float32)
        best_i = tl.zeros([BLOCK_N], dtype=tl.int32)
    else:
        # Padding slots (>= K) hold -inf so they are never the worst slot, i.e. never
        # written. Real slots start at +inf with distinct sentinel indices >= M, so
        # exactly one slot is "the worst" by (value, index) at every step.
        run_v = tl.where(slots[None, :] < K, inf, -inf) + tl.zeros([BLOCK_N, KP], dtype=tl.float32)
        run_i = (M + slots)[None, :] + tl.zeros([BLOCK_N, KP], dtype=tl.int32)

    # Column tiles in increasing order and strict < everywhere: an equal distance met
    # later always has a higher index, so ties keep the lowest index.
    for c0 in range(0, M, BLOCK_M):
        cols = c0 + tl.arange(0, BLOCK_M)
        cross, q_sq, k_sq = _sqdist_tile(q_base, k_base, s_base, rows, cols, N, M, D,
                                         stride_qn, stride_qd, stride_km, stride_kd, stride_sd,
                                         BLOCK_N, BLOCK_M, BLOCK_D, DOT_PRECISION)
        # ||q||^2 is the same for the whole row, so it cannot change the ranking;
        # leaving it out keeps the numbers (and their rounding) smaller.
        d = k_sq[None, :] - 2.0 * cross
        dead = cols[None, :] >= M
        if EXCLUDE_SELF:
            dead = dead | (cols[None, :] == rows[:, None])  # by index, not by distance
        d = tl.where(dead, inf, d)
        if KP == 1:
            tile_v, tile_pos = tl.min(d, axis=1, return_indices=True,
                                      return_indices_tie_break_left=True)
            better = tile_v < best_v
            best_i = tl.where(better, c0 + tile_pos, best_i)
            best_v = tl.where(better, tile_v, best_v)
        else:
            # Only entries below the current worst can enter the running set, and they
            # come out of the tile in ascending order, so that many rounds (at most K)
            # suffice; once the set is tight most tiles need none.
            worst_v = tl.max(run_v, axis=1)
            n_new = tl.sum((d < worst_v[:, None]).to(tl.int32), axis=1)
            n_rounds = tl.minimum(tl.max(n_new, axis=0), K)
            for _ in range(0, n_rounds):
                m_v, m_pos = tl.min(d, axis=1, return_indices=True,
                                    return_indices_tie_break_left=True)
                m_col = c0 + m_pos
                worst_v = tl.max(run_v, axis=1)
                # among slots holding the worst value, the highest index goes first
                worst_i = tl.max(tl.where(run_v == worst_v[:, None], run_i, -1), axis=1)
                put = ((run_v == worst_v[:, None]) & (run_i == worst_i[:, None])
                       & (m_v < worst_v)[:, None])
                run_v = tl.where(put, m_v[:, None], run_v)
                run_i = tl.where(put, m_col[:, None], run_i)
                d = tl.where(cols[None, :] == m_col[:, None], inf, d)

    out = idx_ptr + b * stride_ib + rows.to(tl.int64)[:, None] * stride_in
    if KP == 1:
        tl.store(out + slots[None, :] * stride_ik, best_i[:, None].to(tl.int64),
                 mask=row_ok[:, None])
    else:
        tl.store(out + slots[None, :] * stride_ik, run_i.to(tl.int64),
                 mask=row_ok[:, None] & (slots[None, :] < K))


@triton.jit
def _column_min_kernel(q_ptr, k_ptr, shift_ptr, row_ptr, N, M, D,
                       stride_qb, stride_qn, stride_qd,
                       stride_kb, stride_km, stride_kd,
                       stride_sb, stride_sd,
                       stride_rb, stride_rm,
                       BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                       DOT_PRECISION: tl.constexpr):
    """Per key column of one batch, the query row nearest to it (lowest row on ties)."""
    b = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    q_base = q_ptr + b * stride_qb
    k_base = k_ptr + b * stride_kb
    s_base = shift_ptr + b * stride_sb
    best_v = tl.full([BLOCK_M], float("inf"), dtype=tl.float32)
    best_r = tl.zeros([BLOCK_M], dtype=tl.int32)
    for r0 in range(0, N, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        cross, q_sq, k_sq = _sqdist_tile(q_base, k_base, s_base, rows, cols, N, M, D,
                                         stride_qn, stride_qd, stride_km, stride_kd, stride_sd,
                                         BLOCK_N, BLOCK_M, BLOCK_D, DOT_PRECISION)
        # a column reduction compares different rows, so ||q||^2 must be in
        d = q_sq[:, None] + k_sq[None, :] - 2.0 * cross
        d = tl.where(rows[:, None] < N, d, float("inf"))
        tile_v, tile_pos = tl.min(d, axis=0, return_indices=True,
                                  return_indices_tie_break_left=True)
        better = tile_v < best_v
        best_r = tl.where(better, r0 + tile_pos, best_r)
        best_v = tl.where(better, tile_v, best_v)
    tl.store(row_ptr + b * stride_rb + cols.to(tl.int64) * stride_rm, best_r.to(tl.int64),
             mask=cols < M)


def _blocks(dim, kp=1):
    """(BLOCK_N, BLOCK_M, BLOCK_D): powers of two, >= 16 where tl.dot needs it."""
    # The running top-k is 2 x BLOCK_N x KP values in registers next to the
    # BLOCK_N x BLOCK_M tile; fewer rows per program as k grows keeps it from spilling.
    block_n = 64 if kp <= 16 else 32 if kp <= 64 else 16
    block_d = 16 if dim <= 16 else 32  # 16 is tl.dot's minimum; small D wastes less padding
    return block_n, 64, block_d


def _centering_shift(keys):
    """reference.centering_shift for all batches at once: (B, M, D) -> (B, D) float32.

    Tensor ops only (no host sync), so the op traces under torch.compile. Same grid
    as the C++ path and reference.knn_addmm, so integer data stays integer and its
    ties stay exact.
    """
    mu = keys.mean(1, dtype=torch.float32)
    # max |k - mu| over the batch, without a centred copy of the keys
    spread = torch.maximum(keys.amax(1).float() - mu, mu - keys.amin(1).float()).amax(1, keepdim=True)
    step = torch.exp2(torch.floor(torch.log2(spread)).clamp_min(-126.0))
    snapped = torch.round(mu / step) * step
    keep = (spread == 0) | ~torch.isfinite(mu).all(1, keepdim=True)
    return torch.where(keep, mu, snapped).contiguous()


def _on_device(t):
    # Triton launches on the current CUDA device, which need not be the tensors' one
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@triton_op("fastgen::knn_triton", mutates_args=())
def knn_triton(queries: torch.Tensor, keys: torch.Tensor, k: int,
               exclude_self: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The `k` nearest keys of every query (squared L2), Triton engine.

    Args:
        queries: (B, N, D) float32/float16/bfloat16 on CUDA (or CPU under TRITON_INTERPRET=1).
        keys: (B, M, D), same dtype and device.
        k: 1 <= k <= M - exclude_self.
        exclude_self: drop key i for query i (needs N == M).
        Validation is the caller's (fastgen.ops.knn).

    Returns:
        (dist, idx): float32 (B, N, k) squared distances recomputed as sum((q - k)^2),
        ascending, and int64 (B, N, k) indices; equal distances in index order.
    """
    B, N, D = queries.shape
    M = keys.shape[1]
    idx = torch.empty((B, N, k), dtype=torch.long, device=queries.device)
    if B * N > 0:
        shift = _centering_shift(keys)
        kp = triton.next_power_of_2(k)
        block_n, block_m, block_d = _blocks(D, kp)
        with _on_device(queries):
            wrap_triton(_knn_kernel)[(triton.cdiv(N, block_n), B)](
                queries, keys, shift, idx, N, M, D, k,
                queries.stride(0), queries.stride(1), queries.stride(2),
                keys.stride(0), keys.stride(1), keys.stride(2),
                shift.stride(0), shift.stride(1),
                idx.stride(0), idx.stride(1), idx.stride(2),
                KP=kp, EXCLUDE_SELF=exclude_self,
                BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_D=block_d,
                DOT_PRECISION=_DOT_PRECISION)
    # The kernel's set is unordered and ranked on the expansion: order it by the
    # direct distance, ties by index (index sort first, then a stable distance sort).
    idx = torch.sort(idx, dim=-1).values
    dist = gather_sqdist(queries, keys, idx)
    dist, order = torch.sort(dist, dim=-1, stable=True)
    return dist, torch.gather(idx, -1, order)


@triton_op("fastgen::column_min_triton", mutates_args=())
def column_min_triton(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """GPNN's normaliser: min over queries i of ||q_i - k_j||^2 for every key j.

    Args:
        queries: (B, N, D) float32/float16/bfloat16 on CUDA (or CPU under
            TRITON_INTERPRET=1); N == 0 gives +inf (the minimum over no rows).
        keys: (B, M, D), same dtype and device.

    Returns:
        float32 (B, M), recomputed directly as sum((q_i* - k_j)^2) for the nearest row
        i* the kernel found (so >= 0 and free of the expansion's cancellation).
    """
    B, N, D = queries.shape
    M = keys.shape[1]
    if N == 0:
        return torch.full((B, M), float("inf"), device=queries.device)
    nearest_row = torch.zeros((B, M), dtype=torch.long, device=queries.device)
    if B * M > 0:
        shift = _centering_shift(keys)
        block_n, block_m, block_d = _blocks(D)
        with _on_device(queries):
            wrap_triton(_column_min_kernel)[(triton.cdiv(M, block_m), B)](
                queries, keys, shift, nearest_row, N, M, D,
                queries.stride(0), queries.stride(1), queries.stride(2),
                keys.stride(0), keys.stride(1), keys.stride(2),
                shift.stride(0), shift.stride(1),
                nearest_row.stride(0), nearest_row.stride(1),
                BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_D=block_d,
                DOT_PRECISION=_DOT_PRECISION)
    nearest_q = torch.gather(queries, 1, nearest_row.unsqueeze(-1).expand(B, M, D))
    return (nearest_q.float() - keys.float()).square().sum(-1)


def _knn_triton_fake(queries, keys, k, exclude_self):
    B, N, _ = queries.shape
    return (queries.new_empty((B, N, k), dtype=torch.float32),
            queries.new_empty((B, N, k), dtype=torch.long))


def _column_min_triton_fake(queries, keys):
    return queries.new_empty((keys.shape[0], keys.shape[1]), dtype=torch.float32)


def _keep_opaque(mode, op, types, args, kwargs):
    return mode.__torch_dispatch__(op, types, args, kwargs)


# Under TRITON_INTERPRET=1 @triton.jit gives an InterpretedFunction, which
# wrap_triton hands back untraced: triton_op's default fake impl (the body itself)
# would then launch the kernel on FakeTensors and fail, in opcheck and in
# torch.compile alike. There the ops get shape-only fakes and stay opaque to
# AOTDispatcher instead of being decomposed into their kernels.
if isinstance(_knn_kernel, InterpretedFunction):
    knn_triton.register_fake(_knn_triton_fake)
    knn_triton.register_torch_dispatch(FunctionalTensorMode, _keep_opaque)
    column_min_triton.register_fake(_column_min_triton_fake)
    column_min_triton.register_torch_dispatch(FunctionalTensorMode, _keep_opaque)


def _knn_setup_context(ctx, inputs, output):
    queries, keys, _, _ = inputs
    ctx.save_for_backward(queries, keys, output[1])


def _knn_backward(ctx, grad_dist, grad_idx):
    queries, keys, idx = ctx.saved_tensors
    gq, gk = sqdist_backward(queries, keys, idx, grad_dist,
                             ctx.needs_input_grad[0], ctx.needs_input_grad[1])
    return gq, gk, None, None


# dist is sum((q - k_idx)^2) at the chosen indices, so its gradient needs only them
knn_triton.register_autograd(_knn_backward, setup_context=_knn_setup_context)
