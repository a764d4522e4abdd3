"""Triton kernels of fastgen.ops.reparameterize: fused forward and fused backward.

Grid: (row, block of the row). Each program handles BLOCK contiguous elements of one
row; the forward writes one KL partial per program and the wrapper sums the
(B, blocks) partials in order (deterministic, no atomics). When eps is not given the
forward draws it with tl.randn(seed, flat_index) and the backward regenerates the
same values from the same seed, so eps is never written to memory.
"""
import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

BLOCK = 1024


@triton.jit
def _load_inputs(mu_ptr, lv_ptr, eps_ptr, offs, mask, seed, lo, hi, HAS_EPS: tl.constexpr):
    mu = tl.load(mu_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    raw = tl.load(lv_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    lv = tl.minimum(tl.maximum(raw, lo, propagate_nan=tl.PropagateNan.ALL), hi,
                    propagate_nan=tl.PropagateNan.ALL)
    if HAS_EPS:
        eps = tl.load(eps_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        eps = tl.randn(seed, offs)
    return mu, raw, lv, eps


@triton.jit
def _fwd_kernel(mu_ptr, lv_ptr, eps_ptr, z_ptr, partial_ptr, row_len, seed, lo, hi,
                HAS_EPS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    blk = tl.program_id(1)
    cols = blk * BLOCK + tl.arange(0, BLOCK)
    mask = cols < row_len
    offs = row.to(tl.int64) * row_len + cols
    mu, raw, lv, eps = _load_inputs(mu_ptr, lv_ptr, eps_ptr, offs, mask, seed, lo, hi, HAS_EPS)
    s = tl.exp(0.5 * lv)
    tl.store(z_ptr + offs, (mu + s * eps).to(z_ptr.dtype.element_ty), mask=mask)
    # exp(l) - l - 1 cancels for small |l|. The fp32 policy of every fastgen kernel: a
    # cancellation-free form for |l| < ln 2 (the C++ kernel's reduced argument rounds to
    # n = 0 exactly there), the direct form beyond. Here the Taylor series, through
    # l^10/10! (the next term is < 2e-9 of the sum at |l| = ln 2).
    series = lv * lv * (0.5 + lv * (1.0 / 6 + lv * (1.0 / 24 + lv * (1.0 / 120 + lv * (
        1.0 / 720 + lv * (1.0 / 5040 + lv * (1.0 / 40320 + lv * (1.0 / 362880 + lv * (1.0 / 3628800)))))))))
    term = tl.where(tl.abs(lv) < 0.6931471805599453, series, s * s - lv - 1.0)
    term = tl.where(mask, mu * mu + term, 0.0)
    tl.store(partial_ptr + row.to(tl.int64) * tl.num_programs(1) + blk, 0.5 * tl.sum(term, axis=0))


@triton.jit
def _bwd_kernel(gz_ptr, gk_ptr, mu_ptr, lv_ptr, eps_ptr, gmu_ptr, glv_ptr, row_len, seed, lo, hi,
                HAS_GZ: tl.constexpr, HAS_GK: tl.constexpr, HAS_EPS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    blk = tl.program_id(1)
    cols = blk * BLOCK + tl.arange(0, BLOCK)
    mask = cols < row_len
    offs = row.to(tl.int64) * row_len + cols
    mu, raw, lv, eps = _load_inputs(mu_ptr, lv_ptr, eps_ptr, offs, mask, seed, lo, hi, HAS_EPS)
    s = tl.exp(0.5 * lv)
    gmu = tl.zeros_like(mu)
    glv = tl.zeros_like(mu)
    if HAS_GZ:
        gz = tl.load(gz_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        gmu += gz
        glv += 0.5 * gz * s * eps
    if HAS_GK:
        gk = tl.load(gk_ptr + row).to(tl.float32)
        gmu += gk * mu
        glv += 0.5 * gk * (s * s - 1.0)
    glv = tl.where((raw < lo) | (raw > hi), 0.0, glv)
    tl.store(gmu_ptr + offs, gmu.to(gmu_ptr.dtype.element_ty), mask=mask)
    tl.store(glv_ptr + offs, glv.to(glv_ptr.dtype.element_ty), mask=mask)


def _grid(mu):
    rows = mu.shape[0]
    row_len = mu.numel() // rows
    return rows, row_len, (rows, triton.cdiv(row_len, BLOCK))


@triton_op("fastgen::reparameterize_triton", mutates_args=())
def reparameterize_triton(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor | None, seed: int,
                          logvar_min: float, logvar_max: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, kl) as fastgen.ops.reparameterize; eps=None draws eps in-kernel from `seed`."""
    mu, logvar = mu.contiguous(), logvar.contiguous()
    eps_c = eps.contiguous() if eps is not None else mu  # placeholder pointer when drawn in-kernel
    rows, row_len, grid = _grid(mu)
    z = torch.empty_like(mu)
    partial = torch.empty((rows, grid[1]), dtype=torch.float32, device=mu.device)
    wrap_triton(_fwd_kernel)[grid](mu, logvar, eps_c, z, partial, row_len, seed, logvar_min, logvar_max,
                                   HAS_EPS=eps is not None, BLOCK=BLOCK)
    return z, partial.sum(1)


@triton_op("fastgen::reparameterize_triton_backward", mutates_args=())
def reparameterize_triton_backward(grad_z: torch.Tensor | None, grad_kl: torch.Tensor | None,
                                   mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor | None,
                                   seed: int, logvar_min: float,
                                   logvar_max: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_mu, grad_logvar) in one pass; regenerates eps from `seed` when eps is None."""
    mu, logvar = mu.contiguous(), logvar.contiguous()
    eps_c = eps.contiguous() if eps is not None else mu
    gz = grad_z.contiguous() if grad_z is not None else mu
    gk = grad_kl.contiguous() if grad_kl is not None else mu
    rows, row_len, grid = _grid(mu)
    grad_mu, grad_logvar = torch.empty_like(mu), torch.empty_like(mu)
    wrap_triton(_bwd_kernel)[grid](gz, gk, mu, logvar, eps_c, grad_mu, grad_logvar, row_len, seed,
                                   logvar_min, logvar_max, HAS_GZ=grad_z is not None,
                                   HAS_GK=grad_kl is not None, HAS_EPS=eps is not None, BLOCK=BLOCK)
    return grad_mu, grad_logvar


def _setup_context(ctx, inputs, output):
    mu, logvar, eps, seed, lo, hi = inputs
    ctx.save_for_backward(mu, logvar, eps)
    ctx.args = (seed, lo, hi)


def _backward(ctx, grad_z, grad_kl):
    mu, logvar, eps = ctx.saved_tensors
    seed, lo, hi = ctx.args
    grad_mu, grad_logvar = reparameterize_triton_backward(grad_z, grad_kl, mu, logvar, eps, seed, lo, hi)
    grad_eps = None
    if eps is not None and ctx.needs_input_grad[2] and grad_z is not None:
        grad_eps = (grad_z.float() * torch.exp(0.5 * logvar.float().clamp(lo, hi))).to(eps.dtype)
    return grad_mu, grad_logvar, grad_eps, None, None, None


reparameterize_triton.register_autograd(_backward, setup_context=_setup_context)
