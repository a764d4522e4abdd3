"""Triton backend of ball_count: per point, how many balls (centre, squared radius)
contain it, sure and unsure.

The kernel walks (BLOCK_N points x BLOCK_M centres) tiles of d~ = ||p||^2 + ||c||^2 -
2 p.c (the shared `sqdist_tile`, fp32 "ieee" dots, centred inputs) and, per pair, a
proven error window W = coef (||p|| + ||c||)^2 + slack (the bound of
csrc/engine/error_bound.h for fp32 inputs, doubled as in csrc/engine/ball_count.h):
d~ + W <= r is inside for sure, d~ - W >= next(r) outside for sure, anything else is
counted as unsure. The launcher recounts the (few) rows with unsure pairs in float64,
so the counts are those of the float64 reference. The nearest centre is knn's (k = 1).
"""
import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from fastgen.ops import error_bound

from fastgen.ops.triton._common import (DISTANCE_WARPS, DOT_PRECISION, FP32_DOT, blocks, centering_shift, on_device,
                                        register_for_interpreter, sqdist_tile)


@triton.jit
def _ball_count_kernel(p_ptr, c_ptr, shift_ptr, r_ptr, rn_ptr, count_ptr, unsure_ptr, N, M, D,
                       coef, slack,
                       stride_pn, stride_pd, stride_cm, stride_cd, stride_sd,
                       BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                       DOT_PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    inside = tl.zeros([BLOCK_N], dtype=tl.int32)
    unsure = tl.zeros([BLOCK_N], dtype=tl.int32)
    for c0 in range(0, M, BLOCK_M):
        cols = c0 + tl.arange(0, BLOCK_M)
        col_ok = cols < M
        cross, p_sq, c_sq = sqdist_tile(p_ptr, c_ptr, shift_ptr, rows, cols, N, M, D,
                                         stride_pn, stride_pd, stride_cm, stride_cd, stride_sd,
                                         BLOCK_N, BLOCK_M, BLOCK_D, DOT_PRECISION, FP32_DOT)
        d = p_sq[:, None] + c_sq[None, :] - 2.0 * cross
        ab = tl.sqrt(p_sq)[:, None] * 1.000001 + tl.sqrt(c_sq)[None, :] * 1.000001
        w = coef * ab * ab + slack
        r = tl.load(r_ptr + cols, mask=col_ok, other=-1.0)
        rn = tl.load(rn_ptr + cols, mask=col_ok, other=float("inf"))
        sure_in = (d + w <= r[None, :]) & col_ok[None, :]
        sure_out = (d - w >= rn[None, :]) | (col_ok[None, :] == 0)
        inside += tl.sum(sure_in.to(tl.int32), axis=1)
        unsure += tl.sum(((sure_in == 0) & (sure_out == 0)).to(tl.int32), axis=1)
    tl.store(count_ptr + rows, inside, mask=row_ok)
    tl.store(unsure_ptr + rows, unsure, mask=row_ok)


# 32 key columns per tile: the radii and the window add live values per pair; at 64 the
# sm_90 build spilled 32 bytes (fastgen/gpu_plan.py)
BALL_BLOCK_M = 32


def error_coef(dim):
    """E(a, b) = coef (a + b)^2 + slack of fastgen/ops/error_bound.py for fp32 inputs,
    doubled (ball_count's window): (coef, slack)."""
    return 2 * error_bound.coefficient(dim) * (1 + 1e-6), 2 * error_bound.slack(dim) + 1.4e-45


@triton_op("fastgen::ball_count_triton", mutates_args=())
def ball_count_triton(points: torch.Tensor, centres: torch.Tensor,
                      radii: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(count of sure-inside balls, count of unsure pairs), int32 (N,) each; validation
    and the float64 recount of unsure rows are the caller's (fastgen.ops.ball_count)."""
    N, D = points.shape
    M = centres.shape[0]
    count = torch.zeros((N,), dtype=torch.int32, device=points.device)
    unsure = torch.zeros((N,), dtype=torch.int32, device=points.device)
    if N > 0:
        shift = centering_shift(centres[None])[0]
        r = radii.float().contiguous()
        rn = torch.nextafter(r, torch.full_like(r, float("inf")))
        block_n, _, block_d = blocks(D)
        block_m = BALL_BLOCK_M
        coef, slack = error_coef(D)
        with on_device(points):
            wrap_triton(_ball_count_kernel)[(triton.cdiv(N, block_n),)](
                points, centres, shift, r, rn, count, unsure, N, M, D, coef, slack,
                points.stride(0), points.stride(1), centres.stride(0), centres.stride(1), shift.stride(0),
                BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_D=block_d, DOT_PRECISION=DOT_PRECISION, num_warps=DISTANCE_WARPS)
    return count, unsure


def _fake(points, centres, radii):
    n = points.shape[0]
    return points.new_empty((n,), dtype=torch.int32), points.new_empty((n,), dtype=torch.int32)


register_for_interpreter(ball_count_triton, _ball_count_kernel, _fake)
