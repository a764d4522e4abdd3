"""reparameterize: fastgen.ops.reparameterize against the unfused PyTorch expression.

    pytest benchmarks/bench_reparameterize.py --benchmark-only -k quick --benchmark-json=rep.json
    pytest benchmarks/bench_reparameterize.py --benchmark-only \\
        --benchmark-providers=fastgen-cpp,torch-unfused,torch-compile,copy,copy_

Providers, all on the same seeded float32 (mu, logvar, eps) and incoming gradients
(grad_z like mu, grad_kl (B,)):
- fastgen-cpp: the fused C++ op (one pass forward, one pass backward);
- torch-unfused: what a VAE writes (fastgen.ops.baselines.reparameterize_unfused:
  exp, mul, add for z; square, exp, sub, sum for kl; autograd for the backward);
- torch-compile: the same expression under torch.compile (opt-in: ~20 s to compile;
  the compilation happens in the check's call, before the harness's warm-up call);
- copy: `mu.clone()`, the bandwidth yardstick (allocates its output, as the ops do);
  `copy_`, into a preallocated tensor, is reported too. Both are forward only (skipped
  in the other modes).

Modes (what one call is): forward (no autograd: z and kl); backward (the op's backward
alone, from a graph built once in make, incoming grads for both z and kl: dmu and
dlogvar); full (forward + backward: z, kl, dmu, dlogvar). Bandwidth counts useful
bytes only: forward reads mu, logvar, eps and writes z (4 arrays); backward reads dz,
mu, logvar, eps and writes dmu, dlogvar (6 arrays); full is 10 arrays; copy and copy_
are 2 (their own work, not the suite's). Extra traffic of the unfused version is its
cost, not counted as useful. The report's "vs copy" ratio is a time ratio and exists
in forward rows only; the fraction of the copy's bandwidth is a row's GB/s over the
copy row's GB/s.

The targets: full >= 8x faster than torch-unfused, and >= 50% of the copy's
bandwidth.

Check: for the ops (fastgen-cpp, torch-unfused, torch-compile), every output of the
call against fastgen.ops.reference.reparameterize_reference on float64 copies of the
inputs (rtol = atol = 1e-4): z and kl in forward; the gradients dmu, dlogvar (float64
autograd with the same incoming grads) in backward; all four in full. copy and copy_
are "ok" by construction (a copy is exact: there is nothing to judge).

Fresh output pages matter at (8192, 1024) float32: each array is 32 MiB, at glibc's
mmap threshold, so every output is a new mapping whose 8192 pages fault on first write
(16 ms per array on the development VM, 4x the time of the copy itself). The fused
op advises transparent huge pages on its own outputs (>= 8 MiB) before writing them
(4 ms per array there); the unfused expression and `copy` use the default allocator.
`THP_MEM_ALLOC_ENABLE=1` (a PyTorch allocator setting, process-wide) gives every large
tensor huge pages; the results JSON does not record it, so say so next to any numbers
measured with it set.
"""
import torch

from fastgen.benchmarking import Provider, Suite, cases

DEFAULT_SHAPES = ["8192x1024", "65536x64", "128x16x32x32", "256x16"]
QUICK_SHAPES = ["8192x1024", "1024x64"]
ARRAYS = {"forward": 4, "backward": 6, "full": 10}
RTOL = ATOL = 1e-4


def _shape(p):
    return tuple(int(s) for s in p["shape"].split("x"))


def _numel(p):
    n = 1
    for s in _shape(p):
        n *= s
    return n


def inputs(p):
    shape = _shape(p)
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(shape, generator=g)
    logvar = torch.randn(shape, generator=g)
    eps = torch.randn(shape, generator=g)
    grad_z = torch.randn(shape, generator=g)
    grad_kl = torch.randn(shape[0], generator=g)
    return mu, logvar, eps, grad_z, grad_kl


def _op(name):
    def make(x, p, mode):
        from fastgen.ops import baselines, reparameterize
        if name == "fastgen-cpp":
            fn = lambda m, l, e: reparameterize(m, l, e, backend="cpp")  # noqa: E731
        elif name == "torch-unfused":
            fn = baselines.reparameterize_unfused
        else:
            fn = torch.compile(lambda m, l, e: baselines.reparameterize_unfused(m, l, e), dynamic=False)
        mu, logvar, eps, grad_z, grad_kl = x
        if mode == "forward":   # the harness runs forward calls under torch.no_grad()
            return lambda: fn(mu, logvar, eps)
        m = mu.detach().requires_grad_()
        lv = logvar.detach().requires_grad_()
        if mode == "backward":
            z, kl = fn(m, lv, eps)
            return lambda: torch.autograd.grad([z, kl], [m, lv], [grad_z, grad_kl], retain_graph=True)

        def full():
            z, kl = fn(m, lv, eps)
            dm, dlv = torch.autograd.grad([z, kl], [m, lv], [grad_z, grad_kl])
            return z.detach(), kl.detach(), dm, dlv
        return full
    return make


def _copy(into):
    def make(x, p, mode):
        if mode != "forward":
            import pytest
            pytest.skip("a copy has no backward: the yardstick is forward only")
        mu = x[0]
        if not into:
            return lambda: mu.clone()
        out = torch.empty_like(mu)
        return lambda: out.copy_(mu)
    return make


def _reference(x, mode):
    """The float64 truth of the outputs a call in `mode` returns."""
    from fastgen.ops import reference
    mu, logvar, eps, grad_z, grad_kl = (t.detach().to(torch.float64, copy=True) for t in x)
    m, lv = mu.requires_grad_(), logvar.requires_grad_()
    z, kl = reference.reparameterize_reference(m, lv, eps)
    if mode == "forward":
        return z.detach(), kl.detach()
    dm, dlv = torch.autograd.grad([z, kl], [m, lv], [grad_z, grad_kl])
    return (dm, dlv) if mode == "backward" else (z.detach(), kl.detach(), dm, dlv)


def check(p, x, mode, provider, out):
    """Outputs vs the float64 reference (module docstring); copies are ok by construction."""
    if provider in ("copy", "copy_"):
        return "ok"
    names = {"forward": ("z", "kl"), "backward": ("dmu", "dlogvar"), "full": ("z", "kl", "dmu", "dlogvar")}[mode]
    with torch.enable_grad():
        ref = _reference(x, mode)
    bad = []
    for name, got, want in zip(names, out, ref):
        got = got.detach().double()
        if got.shape != want.shape:
            bad.append(f"{name} shape {tuple(got.shape)} != {tuple(want.shape)}")
        elif not torch.allclose(got, want, rtol=RTOL, atol=ATOL):
            bad.append(f"{name} max abs error {float((got - want).abs().max()):.3g}")
    return "ok" if not bad else "differs from the float64 reference: " + ", ".join(bad)


SUITE = Suite(
    op="reparameterize",
    cases=cases(quick=[dict(shape=s) for s in QUICK_SHAPES], large=[dict(shape=s) for s in DEFAULT_SHAPES]),
    providers={"fastgen-cpp": Provider(_op("fastgen-cpp"), needs_cpp=True),
               "torch-unfused": Provider(_op("torch-unfused")),
               "torch-compile": Provider(_op("torch-compile"), opt_in=True),
               "copy": Provider(_copy(False), work=lambda p, mode: {"bytes": 2 * _numel(p) * 4}),
               "copy_": Provider(_copy(True), work=lambda p, mode: {"bytes": 2 * _numel(p) * 4})},
    inputs=inputs, modes=("forward", "backward", "full"), check=check,
    work=lambda p, mode: {"bytes": ARRAYS[mode] * _numel(p) * 4},
    baselines=("torch-unfused", "copy"),
    rounds=(20, 20),
    file=__file__,
)

test_reparameterize = SUITE.pytest_test()
