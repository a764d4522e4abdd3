"""Triton backend of fold_patches: GPNN's output image as the mean of chosen source patches.

Gather form, as the C++ kernel (csrc/cpu/fold_patches.cpp): each program owns a tile
of BLOCK_C channels x BLOCK_P output pixels of one batch and loops over the p x p
query positions that can cover a pixel, reading the pixel each one's chosen source
patch has there straight from `source`. The (N, C*p*p) patch matrix never exists,
every output pixel is written by exactly one program (no atomics, deterministic), sums
are fp32 and divided by the number of covering query positions, and the result is
stored in the source dtype. Verified under TRITON_INTERPRET=1 only; never timed on a GPU.

Layout, top to bottom: the kernel, the launcher that picks block sizes, the
`torch.library.triton_op` (`fastgen::fold_patches_triton`), the registrations for the
interpreter. Not differentiable (no autograd registration); argument checks, including
the range of `idx`, are the caller's (fastgen.ops.fold_patches).
"""
import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from fastgen.ops import _validate
from fastgen.ops.triton._common import on_device, register_for_interpreter


@triton.jit
def _fold_patches_kernel(src_ptr, idx_ptr, out_ptr, C, Hq, Wq, Wo, n_pix, P, Wsp, n_src,
                         stride_sb, stride_sc, stride_sh, stride_sw,
                         stride_ib, stride_ih, stride_iw,
                         stride_ob, stride_oc, stride_oh, stride_ow,
                         BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """BLOCK_C channels x BLOCK_P (flattened y * Wo + x) output pixels of one batch."""
    pix = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    chan = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = tl.program_id(2).to(tl.int64)
    pix_ok = pix < n_pix
    chan_ok = chan < C
    y = pix // Wo
    x = pix % Wo
    # int64 offsets: B * C * H * W can pass 2^31 long before any one index does
    src_base = src_ptr + b * stride_sb + chan.to(tl.int64)[:, None] * stride_sc
    idx_base = idx_ptr + b * stride_ib
    acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    # query (y - dy, x - dx) covers (y, x) at offset (dy, dx) of its patch
    for dy in range(0, P):
        qy = y - dy
        row_ok = pix_ok & (qy >= 0) & (qy < Hq)
        for dx in range(0, P):
            qx = x - dx
            ok = row_ok & (qx >= 0) & (qx < Wq)
            k = tl.load(idx_base + qy.to(tl.int64) * stride_ih + qx.to(tl.int64) * stride_iw,
                        mask=ok, other=0)
            # The caller checks idx's range; an index outside it still reads nothing
            # and turns the pixels it covers into NaN, so a bad raw call is visible.
            bad = ok & ((k < 0) | (k >= n_src))
            sy = k // Wsp + dy
            sx = k % Wsp + dx
            v = tl.load(src_base + sy[None, :] * stride_sh + sx[None, :] * stride_sw,
                        mask=chan_ok[:, None] & (ok & ~bad)[None, :], other=0.0).to(tl.float32)
            acc += tl.where(bad[None, :], float("nan"), v)
    # covering query positions: rows max(0, y-P+1)..min(Hq-1, y), columns likewise;
    # at least 1 for every real pixel, and clamped so the padding lanes divide by 1
    ny = tl.minimum(Hq - 1, y) - tl.maximum(0, y - P + 1) + 1
    nx = tl.minimum(Wq - 1, x) - tl.maximum(0, x - P + 1) + 1
    mean = acc / tl.maximum(ny * nx, 1).to(tl.float32)[None, :]
    out = (out_ptr + b * stride_ob + chan.to(tl.int64)[:, None] * stride_oc
           + y.to(tl.int64)[None, :] * stride_oh + x.to(tl.int64)[None, :] * stride_ow)
    tl.store(out, mean.to(out_ptr.dtype.element_ty), mask=chan_ok[:, None] & pix_ok[None, :])


def _launch_fold_patches(source, idx, patch, out):
    """Write fold_patches(source, idx, patch) into `out` (B, C, Hq+p-1, Wq+p-1); any strides."""
    B, C, Hs, Ws = source.shape
    Hq, Wq = idx.shape[1:]
    Ho, Wo = out.shape[2:]
    if out.numel() == 0:
        return out
    Wsp = Ws - patch + 1
    n_src = (Hs - patch + 1) * Wsp
    block_c = min(triton.next_power_of_2(C), 4)  # RGB in one program; more channels in chunks
    block_p = 256
    grid = (triton.cdiv(Ho * Wo, block_p), triton.cdiv(C, block_c), B)
    with on_device(source):
        wrap_triton(_fold_patches_kernel)[grid](
            source, idx, out, C, Hq, Wq, Wo, Ho * Wo, patch, Wsp, n_src,
            source.stride(0), source.stride(1), source.stride(2), source.stride(3),
            idx.stride(0), idx.stride(1), idx.stride(2),
            out.stride(0), out.stride(1), out.stride(2), out.stride(3),
            BLOCK_C=block_c, BLOCK_P=block_p)
    return out


@triton_op("fastgen::fold_patches_triton", mutates_args=())
def fold_patches_triton(source: torch.Tensor, idx: torch.Tensor, patch: int) -> torch.Tensor:
    """The mean of the chosen `patch` x `patch` source patches, Triton engine.

    Args:
        source: (B, C, Hs, Ws) float32/float16/bfloat16 on CUDA (or CPU under
            TRITON_INTERPRET=1), Hs, Ws >= patch; any strides (GPNN passes a batch-expanded view).
        idx: (B, Hq, Wq) int64 on the same device, Hq, Wq >= 1, values in
            [0, (Hs - patch + 1) * (Ws - patch + 1)): the flat index row * (Ws - patch + 1) + col
            of the source patch each query position copies. Validation is the caller's
            (fastgen.ops.fold_patches); an out-of-range value reads nothing and makes
            the pixels its query covers NaN.
        patch: p >= 1.

    Returns:
        (B, C, Hq + p - 1, Wq + p - 1) in source's dtype: each pixel the mean over the
        query positions covering it of the pixel their chosen patch has there.
    """
    B, C = source.shape[:2]
    out = torch.empty((B, C, idx.shape[1] + patch - 1, idx.shape[2] + patch - 1),
                      dtype=source.dtype, device=source.device)
    return _launch_fold_patches(source, idx, patch, out)


def _fold_patches_triton_fake(source, idx, patch):
    _validate.one_device(source=source, idx=idx)
    B, C = source.shape[:2]
    return source.new_empty((B, C, idx.shape[1] + patch - 1, idx.shape[2] + patch - 1))


register_for_interpreter(fold_patches_triton, _fold_patches_kernel, _fold_patches_triton_fake)
