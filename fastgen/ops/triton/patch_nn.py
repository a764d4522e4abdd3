"""Triton backend of patch_nn: GPNN's normalised nearest neighbour in two passes.

Pass 1 is `fastgen::column_min_triton`: min over queries of ||q - k_j||^2 per key.
Pass 2: per query row, the argmin over keys of max(||q - k_j||^2, 0) / (alpha + colmin_j).
Both walk tiles with the shared `sqdist_tile` (inputs shifted by `centering_shift(keys)`,
fp32 accumulation), never an N x M buffer. Ties go to the lowest key index (tiles in increasing order, strict <). No
pruning here: the CPU's ball bounds need data-dependent gathers that a first GPU
version leaves out. Verified under TRITON_INTERPRET=1 only; never timed on a GPU.
"""
import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from fastgen.ops.triton._common import (DISTANCE_WARPS, DOT_PRECISION, FP32_DOT, batch_bases, blocks, centering_shift, keep_lower, on_device,
                                        register_for_interpreter, sqdist_tile)


@triton.jit
def _column_min_kernel(q_ptr, k_ptr, shift_ptr, row_ptr, N, M, D,
                       stride_qb, stride_qn, stride_qd,
                       stride_kb, stride_km, stride_kd,
                       stride_sb, stride_sd,
                       stride_rb, stride_rm,
                       BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                       DOT_PRECISION: tl.constexpr):
    """Per key column of one batch, the query row nearest to it (lowest row on ties)."""
    b, q_base, k_base, s_base = batch_bases(q_ptr, k_ptr, shift_ptr, stride_qb, stride_kb, stride_sb)
    cols = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    best_v = tl.full([BLOCK_M], float("inf"), dtype=tl.float32)
    best_r = tl.zeros([BLOCK_M], dtype=tl.int32)
    for r0 in range(0, N, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        cross, q_sq, k_sq = sqdist_tile(q_base, k_base, s_base, rows, cols, N, M, D,
                                         stride_qn, stride_qd, stride_km, stride_kd, stride_sd,
                                         BLOCK_N, BLOCK_M, BLOCK_D, DOT_PRECISION, FP32_DOT)
        # a column reduction compares different rows, so ||q||^2 must be in
        d = q_sq[:, None] + k_sq[None, :] - 2.0 * cross
        d = tl.where(rows[:, None] < N, d, float("inf"))
        tile_v, tile_pos = tl.min(d, axis=0, return_indices=True,
                                  return_indices_tie_break_left=True)
        best_v, best_r = keep_lower(tile_v, tile_pos, r0, best_v, best_r)
    tl.store(row_ptr + b * stride_rb + cols.to(tl.int64) * stride_rm, best_r.to(tl.int64),
             mask=cols < M)


@triton.jit
def _weighted_argmin_kernel(q_ptr, k_ptr, shift_ptr, w_ptr, idx_ptr, N, M, D,
                            stride_qb, stride_qn, stride_qd,
                            stride_kb, stride_km, stride_kd,
                            stride_sb, stride_sd,
                            stride_wb, stride_wm,
                            stride_ib, stride_in,
                            BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                            DOT_PRECISION: tl.constexpr):
    """Per query row of one batch: argmin_j max(d_ij, 0) * w_j, lowest j on ties."""
    b, q_base, k_base, s_base = batch_bases(q_ptr, k_ptr, shift_ptr, stride_qb, stride_kb, stride_sb)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    best_v = tl.full([BLOCK_N], float("inf"), dtype=tl.float32)
    best_i = tl.zeros([BLOCK_N], dtype=tl.int32)
    for c0 in range(0, M, BLOCK_M):
        cols = c0 + tl.arange(0, BLOCK_M)
        cross, q_sq, k_sq = sqdist_tile(q_base, k_base, s_base, rows, cols, N, M, D,
                                         stride_qn, stride_qd, stride_km, stride_kd, stride_sd,
                                         BLOCK_N, BLOCK_M, BLOCK_D, DOT_PRECISION, FP32_DOT)
        w = tl.load(w_ptr + b * stride_wb + cols.to(tl.int64) * stride_wm, mask=cols < M, other=0.0)
        # the weights differ per key, so the row's own ||q||^2 must be in the score
        s = tl.maximum(q_sq[:, None] + k_sq[None, :] - 2.0 * cross, 0.0) * w[None, :]
        s = tl.where(cols[None, :] < M, s, float("inf"))
        tile_v, tile_pos = tl.min(s, axis=1, return_indices=True, return_indices_tie_break_left=True)
        best_v, best_i = keep_lower(tile_v, tile_pos, c0, best_v, best_i)
    tl.store(idx_ptr + b * stride_ib + rows.to(tl.int64) * stride_in, best_i.to(tl.int64), mask=rows < N)


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
        shift = centering_shift(keys)
        block_n, block_m, block_d = blocks(D)
        with on_device(queries):
            wrap_triton(_column_min_kernel)[(triton.cdiv(M, block_m), B)](
                queries, keys, shift, nearest_row, N, M, D,
                queries.stride(0), queries.stride(1), queries.stride(2),
                keys.stride(0), keys.stride(1), keys.stride(2),
                shift.stride(0), shift.stride(1),
                nearest_row.stride(0), nearest_row.stride(1),
                BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_D=block_d,
                DOT_PRECISION=DOT_PRECISION, num_warps=DISTANCE_WARPS)
    nearest_q = torch.gather(queries, 1, nearest_row.unsqueeze(-1).expand(B, M, D))
    return (nearest_q.float() - keys.float()).square().sum(-1)


@triton_op("fastgen::patch_nn_triton", mutates_args=())
def patch_nn_triton(queries: torch.Tensor, keys: torch.Tensor, alpha: float) -> torch.Tensor:
    """GPNN's normalised patch NN on (B, N, D) queries and (B, M, D) keys (M >= 1):
    int64 (B, N) indices of argmin_j ||q - k_j||^2 / (alpha + min_i ||q_i - k_j||^2)."""
    B, N, D = queries.shape
    M = keys.shape[1]
    idx = torch.zeros((B, N), dtype=torch.long, device=queries.device)
    if B * N == 0:
        return idx
    weights = (column_min_triton(queries, keys) + alpha).reciprocal().contiguous()
    shift = centering_shift(keys)
    block_n, block_m, block_d = blocks(D)
    with on_device(queries):
        wrap_triton(_weighted_argmin_kernel)[(triton.cdiv(N, block_n), B)](
            queries, keys, shift, weights, idx, N, M, D,
            queries.stride(0), queries.stride(1), queries.stride(2),
            keys.stride(0), keys.stride(1), keys.stride(2),
            shift.stride(0), shift.stride(1),
            weights.stride(0), weights.stride(1),
            idx.stride(0), idx.stride(1),
            BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_D=block_d,
            DOT_PRECISION=DOT_PRECISION, num_warps=DISTANCE_WARPS)
    return idx


def _patch_nn_triton_fake(queries, keys, alpha):
    return queries.new_empty(queries.shape[:2], dtype=torch.long)


def _column_min_triton_fake(queries, keys):
    return queries.new_empty((keys.shape[0], keys.shape[1]), dtype=torch.float32)


register_for_interpreter(column_min_triton, _column_min_kernel, _column_min_triton_fake)
register_for_interpreter(patch_nn_triton, _weighted_argmin_kernel, _patch_nn_triton_fake)
