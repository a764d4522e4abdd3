"""Triton backend of patch_nn: GPNN's normalised nearest neighbour in two passes.

Pass 1 is `fastgen::column_min_triton` (fastgen/ops/triton/knn.py): min over queries of
||q - k_j||^2 per key. Pass 2 is the kernel below: per query row, the argmin over keys
of max(||q - k_j||^2, 0) / (alpha + colmin_j), tile by tile with the shared
`_sqdist_tile` (inputs shifted by the keys' mean, fp32 accumulation), never an N x M
buffer. Ties go to the lowest key index (tiles in increasing order, strict <). No
pruning here: the CPU's ball bounds need data-dependent gathers that a first GPU
version leaves out. Verified under TRITON_INTERPRET=1 only; never timed on a GPU.
"""
import torch
import triton
import triton.language as tl
from torch._subclasses.functional_tensor import FunctionalTensorMode
from torch.library import triton_op, wrap_triton
from triton.runtime.interpreter import InterpretedFunction

from fastgen.ops.triton.knn import (_DOT_PRECISION, _blocks, _centering_shift, _keep_opaque, _on_device,
                                    _sqdist_tile, column_min_triton)


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
    b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    q_base = q_ptr + b * stride_qb
    k_base = k_ptr + b * stride_kb
    s_base = shift_ptr + b * stride_sb
    best_v = tl.full([BLOCK_N], float("inf"), dtype=tl.float32)
    best_i = tl.zeros([BLOCK_N], dtype=tl.int32)
    for c0 in range(0, M, BLOCK_M):
        cols = c0 + tl.arange(0, BLOCK_M)
        cross, q_sq, k_sq = _sqdist_tile(q_base, k_base, s_base, rows, cols, N, M, D,
                                         stride_qn, stride_qd, stride_km, stride_kd, stride_sd,
                                         BLOCK_N, BLOCK_M, BLOCK_D, DOT_PRECISION)
        w = tl.load(w_ptr + b * stride_wb + cols.to(tl.int64) * stride_wm, mask=cols < M, other=0.0)
        # the weights differ per key, so the row's own ||q||^2 must be in the score
        s = tl.maximum(q_sq[:, None] + k_sq[None, :] - 2.0 * cross, 0.0) * w[None, :]
        s = tl.where(cols[None, :] < M, s, float("inf"))
        tile_v, tile_pos = tl.min(s, axis=1, return_indices=True, return_indices_tie_break_left=True)
        better = tile_v < best_v
        best_i = tl.where(better, c0 + tile_pos, best_i)
        best_v = tl.where(better, tile_v, best_v)
    tl.store(idx_ptr + b * stride_ib + rows.to(tl.int64) * stride_in, best_i.to(tl.int64), mask=rows < N)


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
    shift = _centering_shift(keys)
    block_n, block_m, block_d = _blocks(D)
    with _on_device(queries):
        wrap_triton(_weighted_argmin_kernel)[(triton.cdiv(N, block_n), B)](
            queries, keys, shift, weights, idx, N, M, D,
            queries.stride(0), queries.stride(1), queries.stride(2),
            keys.stride(0), keys.stride(1), keys.stride(2),
            shift.stride(0), shift.stride(1),
            weights.stride(0), weights.stride(1),
            idx.stride(0), idx.stride(1),
            BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_D=block_d,
            DOT_PRECISION=_DOT_PRECISION)
    return idx


def _patch_nn_triton_fake(queries, keys, alpha):
    return queries.new_empty(queries.shape[:2], dtype=torch.long)


# as in triton/knn.py: under the interpreter the op gets a shape-only fake and stays opaque
if isinstance(_weighted_argmin_kernel, InterpretedFunction):
    patch_nn_triton.register_fake(_patch_nn_triton_fake)
    patch_nn_triton.register_torch_dispatch(FunctionalTensorMode, _keep_opaque)
