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


# What the cross term's tl.dot multiplies (sqdist_tile's SCREEN):
FP32_DOT = tl.constexpr(0)   # the fp32 inputs, DOT_PRECISION ("ieee": no tensor cores); a
# tl.constexpr because kernels pass it by name (a plain int global does not compile)
BF16_DOT = 1        # the inputs rounded to bf16, a bf16 x bf16 -> fp32 tensor-core dot
BF16_AS_FP32 = 2    # the same rounded inputs through an fp32 "ieee" dot: the interpreter's
# stand-in for BF16_DOT. Triton 3.9's interpreter returns garbage for a bf16 tl.dot (errors
# ~1e10 on 16 x 16 N(0, 1) inputs, checked) and rounds fp32 -> bf16 towards zero; products
# of bf16 values are exact in fp32, so both modes sum the same exact products in fp32 and
# differ only in summation order, which the error bound covers (fastgen/ops/error_bound.py).


def screen_mode(t):
    """SCREEN for a bf16 screen of tensors like `t`: tensor cores on a GPU, the stand-in
    under the interpreter."""
    return BF16_DOT if t.is_cuda else BF16_AS_FP32


@triton.jit
def round_bf16(x):
    """fp32 -> the nearest bf16 value (ties to even), kept in fp32, by integer ops: the
    rounding is explicit, the same under the interpreter and on a GPU (finite inputs; past
    bf16's largest value it gives inf, as torch's cast)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def sqdist_tile(q_base, k_base, s_base, rows, cols, N, M, D,
                 stride_qn, stride_qd, stride_km, stride_kd, stride_sd,
                 BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, SCREEN: tl.constexpr):
    """(q.k, ||q||^2, ||k||^2) of one tile, all fp32, on inputs shifted by s. SCREEN
    (FP32_DOT / BF16_DOT / BF16_AS_FP32) says what the cross term multiplies; the norms
    are always the fp32 ones."""
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
        if SCREEN == 1:     # BF16_DOT
            cross = tl.dot(round_bf16(q).to(tl.bfloat16), round_bf16(kt).to(tl.bfloat16), cross)
        elif SCREEN == 2:   # BF16_AS_FP32
            cross = tl.dot(round_bf16(q), round_bf16(kt), cross, input_precision="ieee")
        else:
            cross = tl.dot(q, kt, cross, input_precision=DOT_PRECISION)
        q_sq += tl.sum(q * q, axis=1)
        k_sq += tl.sum(kt * kt, axis=0)
    return cross, q_sq, k_sq


@triton.jit
def merge_smallest(d, cols, c0, run_v, run_i, K):
    """The running K smallest (value, index) of every row after one tile d (BLOCK_N x
    BLOCK_M, column indices `cols` = c0 + arange). Only entries below a row's current worst can enter,
    and they come out of the tile in ascending order, so that many rounds (at most K)
    suffice; once the set is tight most tiles need none. Among slots holding the worst
    value the highest index goes first, and strict < keeps the lower index of equal
    values met later (tiles in increasing order): ties keep the lowest indices."""
    worst_v = tl.max(run_v, axis=1)
    n_new = tl.sum((d < worst_v[:, None]).to(tl.int32), axis=1)
    n_rounds = tl.minimum(tl.max(n_new, axis=0), K)
    for _ in range(0, n_rounds):
        m_v, m_pos = tl.min(d, axis=1, return_indices=True, return_indices_tie_break_left=True)
        m_col = c0 + m_pos
        worst_v = tl.max(run_v, axis=1)
        worst_i = tl.max(tl.where(run_v == worst_v[:, None], run_i, -1), axis=1)
        put = ((run_v == worst_v[:, None]) & (run_i == worst_i[:, None]) & (m_v < worst_v)[:, None])
        run_v = tl.where(put, m_v[:, None], run_v)
        run_i = tl.where(put, m_col[:, None], run_i)
        d = tl.where(cols[None, :] == m_col[:, None], float("inf"), d)
    return run_v, run_i


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
