"""Triton bf16 screen: per query row, the KC smallest lower bounds of a score, from a
tile sweep whose cross term runs on bf16-rounded inputs (tensor cores on a GPU). The
screen only proposes: fastgen/ops/certified.py keeps every key whose lower bound is below
the k-th smallest upper bound and re-ranks those in float64, so the ops' answers are exact.

Scores s~ (fp32, of inputs shifted by `centering_shift(keys)`) and what is kept, with
E = coef (||q|| + ||k||)^2 + slack the proven bound (fastgen/ops/error_bound.py):
- plain:    s~ = ||k||^2 - 2 q.k, kept L = s~ - E       (knn: ||q||^2 cannot reorder a row)
- weighted: s~ = max(||q||^2 + ||k||^2 - 2 q.k, 0) w_k, kept L = s~ - w_k E   (patch_nn)
E is taken per row and key tile (the tile's largest ||k||): a key far from the centre
widens the window of its own tile only.
"""
import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from fastgen.ops.triton._common import (DISTANCE_WARPS, DOT_PRECISION, FP32_DOT, batch_bases, blocks, centering_shift,
                                        merge_smallest, on_device, register_for_interpreter, screen_mode,
                                        sqdist_tile)


@triton.jit
def _screen_kernel(q_ptr, k_ptr, shift_ptr, w_ptr, val_ptr, idx_ptr, N, M, D, coef, slack,
                   stride_qb, stride_qn, stride_qd,
                   stride_kb, stride_km, stride_kd,
                   stride_sb, stride_sd,
                   stride_wb, stride_wm,
                   stride_ob, stride_on, stride_ok,
                   KC: tl.constexpr, EXCLUDE_SELF: tl.constexpr, WEIGHTED: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, SCREEN: tl.constexpr):
    """(lower bounds, indices), unordered, of the KC smallest lower bounds of BLOCK_N rows.
    Slots never filled keep +inf and an index >= M."""
    b, q_base, k_base, s_base = batch_bases(q_ptr, k_ptr, shift_ptr, stride_qb, stride_kb, stride_sb)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    slots = tl.arange(0, KC)
    run_v = tl.full([BLOCK_N, KC], float("inf"), dtype=tl.float32)
    run_i = (M + slots)[None, :] + tl.zeros([BLOCK_N, KC], dtype=tl.int32)
    for c0 in range(0, M, BLOCK_M):
        cols = c0 + tl.arange(0, BLOCK_M)
        cross, q_sq, k_sq = sqdist_tile(q_base, k_base, s_base, rows, cols, N, M, D,
                                         stride_qn, stride_qd, stride_km, stride_kd, stride_sd,
                                         BLOCK_N, BLOCK_M, BLOCK_D, DOT_PRECISION, SCREEN)
        # E per row with the tile's largest key norm (one value per row, not per pair:
        # fewer live registers); square roots nudged up (sqrt may be approximate on a GPU)
        # (padded columns load -shift: they must not count)
        ab = tl.sqrt(q_sq) * 1.000001 + tl.max(tl.where(cols < M, tl.sqrt(k_sq), 0.0), axis=0) * 1.000001
        e = coef * ab * ab + slack
        if WEIGHTED:
            w = tl.load(w_ptr + b * stride_wb + cols.to(tl.int64) * stride_wm, mask=cols < M, other=0.0)
            s = (tl.maximum(q_sq[:, None] + k_sq[None, :] - 2.0 * cross, 0.0) - e[:, None]) * w[None, :]
        else:
            s = k_sq[None, :] - 2.0 * cross - e[:, None]
        dead = cols[None, :] >= M
        if EXCLUDE_SELF:
            dead = dead | (cols[None, :] == rows[:, None])  # by index, not by distance
        s = tl.where(dead, float("inf"), s)
        run_v, run_i = merge_smallest(s, cols, c0, run_v, run_i, KC)
    at = b * stride_ob + rows.to(tl.int64)[:, None] * stride_on + slots[None, :] * stride_ok
    ok = (rows < N)[:, None]
    tl.store(val_ptr + at, run_v, mask=ok)
    tl.store(idx_ptr + at, run_i.to(tl.int64), mask=ok)


def screen_blocks(dim, kc):
    """(BLOCK_N, BLOCK_M, BLOCK_D): 32 rows per program, 32 key columns (64 at 32 slots).
    Chosen by compiling every configuration (fastgen/gpu_plan.py): ptxas caps some at 64
    or 128 registers and spills 8-36 bytes -- with 64 rows at 16 slots, with 64 columns
    at 16 and 64 slots (fp32, sm_90), with 32 columns at 32 slots (fp16/bf16, sm_80)."""
    _, _, block_d = blocks(dim, kc)
    return 32, (64 if kc == 32 else 32), block_d


@triton_op("fastgen::screen_triton", mutates_args=())
def screen_triton(queries: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor | None, kc: int,
                  exclude_self: bool, coef: float, slack: float, fp32: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The `kc` (a power of two) smallest lower bounds of bf16-screened scores per query row.

    Args:
        queries: (B, N, D) float32/float16/bfloat16 on CUDA (or CPU under TRITON_INTERPRET=1).
        keys: (B, M, D), same dtype and device.
        weights: None (plain score) or float32 (B, M) key weights (weighted score).
        kc: slots per row, a power of two. exclude_self: drop key i for query i (N == M).
        coef, slack: the error bound E (fastgen.ops.error_bound) the lower bounds subtract.
        fp32: cross terms from fp32 "ieee" dots instead of bf16 ones (the second stage).
        Validation is the caller's (fastgen.ops.certified).

    Returns:
        (lower, idx): float32 and int64 (B, N, kc), unordered; unfilled slots +inf, idx >= M.
    """
    B, N, D = queries.shape
    M = keys.shape[1]
    vals = torch.empty((B, N, kc), dtype=torch.float32, device=queries.device)
    idx = torch.empty((B, N, kc), dtype=torch.long, device=queries.device)
    if B * N > 0:
        shift = centering_shift(keys)
        w = shift.new_empty((B, 1)) if weights is None else weights
        block_n, block_m, block_d = screen_blocks(D, kc)
        with on_device(queries):
            wrap_triton(_screen_kernel)[(triton.cdiv(N, block_n), B)](
                queries, keys, shift, w, vals, idx, N, M, D, coef, slack,
                queries.stride(0), queries.stride(1), queries.stride(2),
                keys.stride(0), keys.stride(1), keys.stride(2),
                shift.stride(0), shift.stride(1),
                w.stride(0), w.stride(1),
                idx.stride(0), idx.stride(1), idx.stride(2),
                KC=kc, EXCLUDE_SELF=exclude_self, WEIGHTED=weights is not None,
                BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_D=block_d,
                DOT_PRECISION=DOT_PRECISION, SCREEN=FP32_DOT.value if fp32 else screen_mode(queries),
                num_warps=DISTANCE_WARPS)
    return vals, idx


def _screen_triton_fake(queries, keys, weights, kc, exclude_self, coef, slack, fp32):
    B, N, _ = queries.shape
    return (queries.new_empty((B, N, kc), dtype=torch.float32),
            queries.new_empty((B, N, kc), dtype=torch.long))


register_for_interpreter(screen_triton, _screen_kernel, _screen_triton_fake)
