"""What every Triton kernel of fastgen shares: the squared-distance tile, block sizes,
the device guard and how an op is registered so that it runs (and traces) under
TRITON_INTERPRET=1 on CPU tensors as well as on a GPU.

Centring: every distance kernel shifts both point sets by
fastgen.ops.baselines.centering_shift(keys) -- the shift the C++ engine and the torch
backend use too (see DESIGN.md on cancellation).
"""
import contextlib

import torch
import triton
import triton.language as tl
from torch._subclasses.functional_tensor import FunctionalTensorMode
from triton.runtime.interpreter import InterpretedFunction

from fastgen.ops.baselines import centering_shift  # noqa: F401  (re-exported for the kernels' launchers)

# The GPU default for an fp32 tl.dot is tf32, which keeps 10 mantissa bits of each
# input: near neighbours swap and exact ties on integer data stop being ties. "ieee"
# keeps the fp32 ranking the torch backend has. (The interpreter ignores it.)
DOT_PRECISION = "ieee"


@triton.jit
def sqdist_tile(q_base, k_base, s_base, rows, cols, N, M, D,
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
def batch_bases(q_ptr, k_ptr, shift_ptr, stride_qb, stride_kb, stride_sb):
    """(batch index, its queries, keys and shift) of this program (grid axis 1 = batch)."""
    b = tl.program_id(1).to(tl.int64)
    return b, q_ptr + b * stride_qb, k_ptr + b * stride_kb, shift_ptr + b * stride_sb


@triton.jit
def keep_lower(tile_v, tile_pos, offset, best_v, best_i):
    """Running (min, argmin) after one tile's (min, position): strict < and tiles in
    increasing order, so an equal value met later (a higher index) never replaces."""
    better = tile_v < best_v
    return tl.where(better, tile_v, best_v), tl.where(better, offset + tile_pos, best_i)


# Warps per program of the distance kernels (knn, column min, weighted argmin, ball
# count). Compiled for sm_80 and sm_90 (fastgen/gpu_plan.py), 64 x 64 tiles with D in
# chunks of 16 spill nothing at 8 warps; at 4 warps, or with chunks of 32, they used
# all 255 registers and spilled 16-424 bytes (benchmarks/RESULTS.md, "GPU plan").
DISTANCE_WARPS = 8


def blocks(dim, kp=1):
    """(BLOCK_N, BLOCK_M, BLOCK_D): powers of two, >= 16 where tl.dot needs it."""
    # The running top-k is 2 x BLOCK_N x KP values in registers next to the
    # BLOCK_N x BLOCK_M tile; fewer rows per program as k grows keeps it from spilling.
    block_n = 64 if kp <= 16 else 32
    return block_n, 64, 16     # D in chunks of 16 (tl.dot's minimum): no spills, see DISTANCE_WARPS


def on_device(t):
    # Triton launches on the current CUDA device, which need not be the tensors' one
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _keep_opaque(mode, op, types, args, kwargs):
    return mode.__torch_dispatch__(op, types, args, kwargs)


def register_for_interpreter(op, kernel, fake):
    """Under TRITON_INTERPRET=1 @triton.jit gives an InterpretedFunction, which
    wrap_triton hands back untraced: triton_op's default fake impl (the body itself)
    would then launch the kernel on FakeTensors and fail, in opcheck and in
    torch.compile alike. There the op gets the shape-only `fake` and stays opaque to
    AOTDispatcher instead of being decomposed into its kernels. On a GPU: nothing to do."""
    if isinstance(kernel, InterpretedFunction):
        op.register_fake(fake)
        op.register_torch_dispatch(FunctionalTensorMode, _keep_opaque)
