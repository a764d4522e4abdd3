"""fastgen.ops.reparameterize: the VAE reparameterization and its KL, fused.

    z  = mu + exp(0.5 * logvar) * eps
    kl = 0.5 * sum_row(mu^2 + exp(logvar) - logvar - 1)      (KL(N(mu, exp(logvar)) || N(0, I)))

Forward is one pass over (mu, logvar, eps) and backward one pass that produces the
gradients of z and kl together (cpp: csrc/cpu/reparameterize.cpp; triton:
fastgen/ops/triton/reparameterize.py, which generates eps from a seed inside the
kernel when eps is not given and regenerates it in the backward, never storing it).

exp(l) - l - 1 cancels for small |l| (a posterior close to the prior). One policy per
precision across the fused kernels: fp32 (C++ and Triton) use a cancellation-free form
for |l| < ln 2 and the direct form beyond; float64 (C++) the Taylor series for
|l| < 0.1. The `torch` backend is the unfused expression users write
(fastgen.ops.baselines.reparameterize_unfused, the direct form), as a baseline should be.
"""
import math

import torch

from fastgen import _ext
from fastgen.ops import _backend, _validate, baselines

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
REDUCTIONS = ("none", "sum", "mean")


def _check_tensor(t, name, mu=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    if mu is None:
        if t.dim() == 0:
            raise ValueError(f"{name} must have a batch dimension (at least 1-D), got a 0-D tensor")
        if t.numel() == 0:
            raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")
        return
    if t.shape != mu.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but mu has shape {tuple(mu.shape)}; they must match")
    if t.dtype != mu.dtype:
        raise TypeError(f"{name} is {t.dtype} but mu is {mu.dtype}; cast one of them")
    if t.device != mu.device:
        raise ValueError(f"{name} is on {t.device} but mu is on {mu.device}")


def _check_finite(t, name):
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name} contains NaN or infinite values ({bad} of {t.numel()} elements)")


def _clamp_bounds(logvar_clamp):
    if logvar_clamp is None:
        return None, None
    if not isinstance(logvar_clamp, (tuple, list)) or len(logvar_clamp) != 2:
        raise ValueError(f"logvar_clamp must be None or a (min, max) pair, got {logvar_clamp!r}")
    lo, hi = (None if v is None else float(v) for v in logvar_clamp)
    if any(v is not None and math.isnan(v) for v in (lo, hi)):
        raise ValueError(f"logvar_clamp must not contain NaN, got {logvar_clamp!r}")
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"logvar_clamp min ({lo}) must be <= max ({hi})")
    return lo, hi


def draw_seed(generator, device):
    """A 62-bit seed for the Triton kernel's in-kernel Philox stream, from `generator`
    (or the default generator of `device`), so a seeded generator reproduces z."""
    dev = generator.device if generator is not None else device
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=dev).item())


def reparameterize(mu, logvar, eps=None, generator=None, *, reduction="none", logvar_clamp=None,
                   check_finite=False, backend="auto"):
    """Sample z ~ N(mu, exp(logvar)) by reparameterization, and KL(q || N(0, I)) per row.

    Args:
        mu, logvar: (B, ...) same shape, dtype (float32/float16/bfloat16/float64) and
            device. Row b is everything at index b of dim 0, so (B, D) vectors and conv
            latents (B, C, H, W) both work; the KL sums over all non-batch dims.
        eps: optional (B, ...) standard-normal noise. None draws it: on CPU with
            `torch.randn(generator=generator)` (reproducible with a seeded generator);
            on the Triton backend inside the kernel from a seed drawn from `generator`,
            so it is never stored (the backward regenerates it).
        generator: torch.Generator for the noise when eps is None.
        reduction: "none" -> kl has shape (B,); "sum" / "mean" over the batch -> scalar.
        logvar_clamp: None, or (min, max) with either end None. logvar is clamped to
            [min, max] before use in both z and kl, and its gradient is 0 where it was
            clamped (torch.clamp semantics). Use it to keep exp(logvar) from
            overflowing early in training (fastgen.nn.GaussianLatent uses (-30, 20)).
            Off by default: the op then computes exactly the formula above.
        check_finite: raise a ValueError naming the argument if mu, logvar or eps holds
            NaN/inf. Off here for speed (one extra read of each input); the layer
            turns it on.
        backend: "auto" (cpp on CPU, triton on CUDA), "cpp", "triton" or "torch" (the
            unfused PyTorch expression, fastgen.ops.baselines.reparameterize_unfused).

    Returns:
        (z, kl): z shaped and typed like mu; kl float32 (float64 for float64 inputs),
        shape (B,) or a scalar after reduction. Both are differentiable w.r.t. mu and
        logvar (and eps when it is given and requires grad). Math is float32 for
        half inputs; KL row sums are accumulated in float64 on the cpp backend.
    """
    _check_tensor(mu, "mu")
    _check_tensor(logvar, "logvar", mu)
    if eps is not None:
        _check_tensor(eps, "eps", mu)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    lo, hi = _clamp_bounds(logvar_clamp)
    if check_finite:
        _check_finite(mu, "mu")
        _check_finite(logvar, "logvar")
        if eps is not None:
            _check_finite(eps, "eps")
    be = _backend.resolve(backend, mu.device)

    if be == "triton":
        if mu.dtype == torch.float64:
            raise TypeError("backend='triton' supports float32, float16 and bfloat16 inputs, got mu of float64")
        from fastgen.ops.triton.reparameterize import reparameterize_triton
        seed = draw_seed(generator, mu.device) if eps is None else 0
        z, kl = reparameterize_triton(mu, logvar, eps, seed,
                                      -math.inf if lo is None else lo, math.inf if hi is None else hi)
    else:
        if eps is None:
            try:
                eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)
            except RuntimeError as exc:
                raise ValueError(f"generator (on {generator.device}) cannot draw eps for mu on "
                                 f"{mu.device}: {exc}") from exc
        if be == "cpp":
            z, kl = torch.ops.fastgen.reparameterize(mu, logvar, eps, lo, hi)
        else:
            z, kl = baselines.reparameterize_unfused(mu, logvar, eps, lo, hi)
    if reduction == "sum":
        kl = kl.sum()
    elif reduction == "mean":
        kl = kl.mean()
    return z, kl


def _kl_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


if _ext.CPP_AVAILABLE:
    @torch.library.register_fake("fastgen::reparameterize")
    def _reparameterize_fake(mu, logvar, eps, logvar_min, logvar_max):
        _validate.one_device(mu=mu, logvar=logvar, eps=eps)
        return torch.empty_like(mu), mu.new_empty((mu.shape[0],), dtype=_kl_dtype(mu.dtype))

    @torch.library.register_fake("fastgen::reparameterize_backward")
    def _reparameterize_backward_fake(grad_z, grad_kl, mu, logvar, eps, logvar_min, logvar_max):
        _validate.one_device(grad_z=grad_z, grad_kl=grad_kl, mu=mu, logvar=logvar, eps=eps)
        return torch.empty_like(mu), torch.empty_like(mu)

    def _setup_context(ctx, inputs, output):
        mu, logvar, eps, lo, hi = inputs
        ctx.save_for_backward(mu, logvar, eps)
        ctx.bounds = (lo, hi)

    def _backward(ctx, grad_z, grad_kl):
        if torch.is_grad_enabled():  # create_graph=True: the fused backward has no derivative
            raise RuntimeError("double backward through fastgen reparameterize is not supported; "
                               "use backend='torch' for higher-order gradients")
        mu, logvar, eps = ctx.saved_tensors
        lo, hi = ctx.bounds
        grad_mu, grad_logvar = torch.ops.fastgen.reparameterize_backward(grad_z, grad_kl, mu, logvar, eps, lo, hi)
        grad_eps = None
        if ctx.needs_input_grad[2] and grad_z is not None:
            lv = logvar.float() if logvar.dtype != torch.float64 else logvar
            if lo is not None or hi is not None:
                lv = lv.clamp(lo, hi)
            grad_eps = (grad_z * torch.exp(0.5 * lv)).to(eps.dtype)
        return grad_mu, grad_logvar, grad_eps, None, None

    torch.library.register_autograd("fastgen::reparameterize", _backward, setup_context=_setup_context)
