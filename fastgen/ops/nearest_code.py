"""fastgen.ops.nearest_code: the VQ codebook lookup (exact argmin over codes)."""
from typing import NamedTuple

import torch

from fastgen import _ext
from fastgen.ops import _validate
from fastgen.ops._sqdist_grad import sqdist_backward
from fastgen.ops.knn_plan import plan_knn
from fastgen.ops.knn_sweep import run_sweep


class NearestCode(NamedTuple):
    """nearest_code's result, in knn's order: (dist, idx)."""
    dist: torch.Tensor  # (N,) float32 squared distance to the chosen code
    idx: torch.Tensor   # (N,) int64 code index


def nearest_code(x, codebook, *, backend="auto", precision="fp32"):
    """Index of the nearest code for every row of `x`.

    Args:
        x: (N, D) encoder outputs, float32/float16/bfloat16.
        codebook: (K, D) codes, same dtype and device.
        backend, precision: as in `fastgen.ops.knn`.

    Returns:
        NearestCode(dist, idx) -- the order of knn (and faiss): float32 (N,) squared
        distances sum((x - codebook[idx])^2), differentiable, and int64 (N,) code
        indices (ties to the lowest index). Before fastgen 0.2 the order was (idx, dist);
        `.idx` / `.dist` read the same in both.
    """
    _validate.points(x, "x", ndims=(2,))
    _validate.points(codebook, "codebook", ndims=(2,))
    _validate.same_kind(x, "x", codebook, "codebook")
    if codebook.shape[0] == 0:
        raise ValueError("codebook is empty (0 codes)")
    _validate.precision(precision)
    # knn's planner decides the backend and the precision that runs (bf16 only where its
    # sample says it pays); a codebook lookup never prunes (the codebook is the small side)
    plan = plan_knn(x, codebook, 1, backend=backend, precision=precision, prune=False)
    if plan.backend != "cpp":  # the C++ op checks the same inside its first pass over the data
        _validate.distance_inputs(x, "x", codebook, "codebook")
    if plan.backend == "cpp":
        # the fused C++ argmin (one code per row, no top-k bookkeeping)
        return NearestCode(*torch.ops.fastgen.nearest_code(x.contiguous(), codebook.contiguous(), plan.precision))
    dist, idx = run_sweep(x, codebook, 1, False, plan)
    return NearestCode(dist[:, 0], idx[:, 0])


if _ext.CPP_AVAILABLE:
    @torch.library.register_fake("fastgen::nearest_code")
    def _nearest_code_fake(x, codebook, precision):
        _validate.fake_point_sets(x.unsqueeze(0), codebook.unsqueeze(0), "x", "codebook")
        _validate.precision(precision)
        if codebook.shape[0] == 0:
            raise ValueError("codebook is empty (0 codes)")
        n = x.shape[0]
        return x.new_empty((n,), dtype=torch.float32), x.new_empty((n,), dtype=torch.long)

    def _setup_context(ctx, inputs, output):
        x, codebook, _ = inputs
        ctx.save_for_backward(x, codebook, output[1])
        ctx.mark_non_differentiable(output[1])  # indices carry no gradient

    def _backward(ctx, grad_dist, grad_idx):
        x, codebook, idx = ctx.saved_tensors
        gx, gc = sqdist_backward(x.unsqueeze(0), codebook.unsqueeze(0), idx.view(1, -1, 1),
                                 grad_dist.view(1, -1, 1),
                                 ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return (gx[0] if gx is not None else None), (gc[0] if gc is not None else None), None

    torch.library.register_autograd("fastgen::nearest_code", _backward, setup_context=_setup_context)
