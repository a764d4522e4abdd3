"""Triton backend of knn: exact k nearest neighbours (row top-k of squared L2).

The kernel walks (BLOCK_N queries x BLOCK_M keys) tiles, builds each tile as
||k||^2 - 2 q.k with the shared `sqdist_tile` (tl.dot over D in BLOCK_D chunks, inputs
shifted by `centering_shift(keys)`), and keeps a running top-k while the tile is in
registers, so the N x M matrix never exists. What the op returns is recomputed
directly as sum((q - k)^2) in fp32 from the indices the kernel picks.

Layout, top to bottom: the kernel, the `torch.library.triton_op` (`fastgen::knn_triton`)
whose body is plain torch ops plus a `wrap_triton` launch, so torch.compile traces into
it, then the registrations for the interpreter and autograd.
"""
import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from fastgen.ops._sqdist_grad import sqdist_backward
from fastgen.ops.baselines import gather_sqdist
from fastgen.ops.triton._common import (DISTANCE_WARPS, DOT_PRECISION, FP32_DOT, batch_bases, blocks, centering_shift, keep_lower,
                                        merge_smallest, on_device, register_for_interpreter, sqdist_tile)


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
    b, q_base, k_base, s_base = batch_bases(q_ptr, k_ptr, shift_ptr, stride_qb, stride_kb, stride_sb)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
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
        cross, q_sq, k_sq = sqdist_tile(q_base, k_base, s_base, rows, cols, N, M, D,
                                         stride_qn, stride_qd, stride_km, stride_kd, stride_sd,
                                         BLOCK_N, BLOCK_M, BLOCK_D, DOT_PRECISION, FP32_DOT)
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
            best_v, best_i = keep_lower(tile_v, tile_pos, c0, best_v, best_i)
        else:
            run_v, run_i = merge_smallest(d, cols, c0, run_v, run_i, K)

    out = idx_ptr + b * stride_ib + rows.to(tl.int64)[:, None] * stride_in
    if KP == 1:
        tl.store(out + slots[None, :] * stride_ik, best_i[:, None].to(tl.int64),
                 mask=row_ok[:, None])
    else:
        tl.store(out + slots[None, :] * stride_ik, run_i.to(tl.int64),
                 mask=row_ok[:, None] & (slots[None, :] < K))


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
        shift = centering_shift(keys)
        kp = triton.next_power_of_2(k)
        block_n, block_m, block_d = blocks(D, kp)
        with on_device(queries):
            wrap_triton(_knn_kernel)[(triton.cdiv(N, block_n), B)](
                queries, keys, shift, idx, N, M, D, k,
                queries.stride(0), queries.stride(1), queries.stride(2),
                keys.stride(0), keys.stride(1), keys.stride(2),
                shift.stride(0), shift.stride(1),
                idx.stride(0), idx.stride(1), idx.stride(2),
                KP=kp, EXCLUDE_SELF=exclude_self,
                BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_D=block_d,
                DOT_PRECISION=DOT_PRECISION, num_warps=DISTANCE_WARPS)
    # The kernel's set is unordered and ranked on the expansion: order it by the
    # direct distance, ties by index (index sort first, then a stable distance sort).
    idx = torch.sort(idx, dim=-1).values
    dist = gather_sqdist(queries, keys, idx)
    dist, order = torch.sort(dist, dim=-1, stable=True)
    return dist, torch.gather(idx, -1, order)


def _knn_triton_fake(queries, keys, k, exclude_self):
    B, N, _ = queries.shape
    return (queries.new_empty((B, N, k), dtype=torch.float32),
            queries.new_empty((B, N, k), dtype=torch.long))


register_for_interpreter(knn_triton, _knn_kernel, _knn_triton_fake)


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
