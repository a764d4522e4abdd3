"""fastgen.ops.reparameterize on every backend against the float64 ground truth
(reference.reparameterize_reference on float64 copies of the inputs).

Triton runs under TRITON_INTERPRET=1 on CPU tensors (set before fastgen/triton is
imported: triton reads it when it decorates a kernel), on small shapes.
"""
import math
import os

if "TRITON_INTERPRET" not in os.environ:
    import torch as _torch
    if not _torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from fastgen.ops import reference, reparameterize  # noqa: E402
from conftest import backends  # noqa: E402
from helpers import assert_close  # noqa: E402

# dtype, (rtol, atol) of z and of the gradients (outputs are rounded to the input dtype),
# rtol of kl (float32 output, computed in float32 from exactly representable inputs)
DTYPES = [
    (torch.float32, (1e-5, 1e-5), 1e-5),
    (torch.float16, (2e-3, 2e-3), 1e-5),
    (torch.bfloat16, (1.6e-2, 1.6e-2), 1e-5),
]
# (1,) one element; (7,) a 1-D batch (one element per row); odd 2-D; a conv latent;
# a row longer than the cpp kernel's 16384-element block (split + in-order partials)
SHAPES = [(1,), (7,), (1, 1), (3, 123), (5, 3, 7, 9), (2, 40000)]
SMALL_SHAPES = [(1,), (1, 1), (3, 123), (2, 3, 5, 7), (2, 1500)]  # Triton interpreter
CLAMPS = [None, (-1.0, 0.5)]
ALL_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def shapes_for(backend):
    return SMALL_SHAPES if backend == "triton" else SHAPES


def cases():
    return [(b, s) for b in backends() for s in shapes_for(b)]


def inputs(shape, dtype, requires_grad=False):
    mu = torch.randn(shape).to(dtype)
    lv = (torch.randn(shape) * 1.5).to(dtype)
    eps = torch.randn(shape).to(dtype)
    if requires_grad:
        mu.requires_grad_()
        lv.requires_grad_()
    return mu, lv, eps


def reference64(mu, lv, eps, clamp):
    """z, kl and (if asked) the autograd graph in float64 on the same rounded inputs."""
    lo, hi = clamp if clamp else (None, None)
    m = mu.detach().double().requires_grad_()
    l = lv.detach().double().requires_grad_()
    z, kl = reference.reparameterize_reference(m, l, eps.detach().double(), lo, hi)
    return m, l, z, kl


@pytest.mark.parametrize("backend,shape", cases())
@pytest.mark.parametrize("dtype,tol,kl_rtol", DTYPES)
@pytest.mark.parametrize("clamp", CLAMPS)
def test_forward_matches_float64_reference(backend, shape, dtype, tol, kl_rtol, clamp):
    mu, lv, eps = inputs(shape, dtype)
    z, kl = reparameterize(mu, lv, eps, logvar_clamp=clamp, backend=backend)
    _, _, z_ref, kl_ref = reference64(mu, lv, eps, clamp)
    assert z.shape == mu.shape and z.dtype == dtype
    assert kl.shape == (shape[0],) and kl.dtype == torch.float32
    assert_close(z, z_ref, rtol=tol[0], atol=tol[1])
    assert_close(kl, kl_ref, rtol=kl_rtol, atol=kl_rtol)


@pytest.mark.parametrize("backend,shape", cases())
@pytest.mark.parametrize("dtype,tol,kl_rtol", DTYPES)
@pytest.mark.parametrize("clamp", CLAMPS)
@pytest.mark.parametrize("uses", ["z+kl", "z", "kl"])
def test_backward_matches_float64_reference(backend, shape, dtype, tol, kl_rtol, clamp, uses):
    mu, lv, eps = inputs(shape, dtype, requires_grad=True)
    z, kl = reparameterize(mu, lv, eps, logvar_clamp=clamp, backend=backend)
    m, l, z_ref, kl_ref = reference64(mu, lv, eps, clamp)
    gz = torch.randn(shape).to(dtype)
    gk = torch.randn(shape[0])
    outs, refs, grads = [], [], []
    if "z" in uses:
        outs.append(z), refs.append(z_ref), grads.append(gz)
    if "kl" in uses:
        outs.append(kl), refs.append(kl_ref), grads.append(gk)
    g_mu, g_lv = torch.autograd.grad(outs, [mu, lv], grads)
    r_mu, r_lv = torch.autograd.grad(refs, [m, l], [g.double() for g in grads])
    assert g_mu.dtype == dtype and g_lv.dtype == dtype
    # gradients through kl scale with mu and exp(lv): relative tolerance of the dtype
    assert_close(g_mu, r_mu, rtol=tol[0], atol=tol[1])
    assert_close(g_lv, r_lv, rtol=tol[0], atol=tol[1])


@pytest.mark.parametrize("backend", [b for b in backends() if b != "triton"])
@pytest.mark.parametrize("clamp", CLAMPS)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_gradcheck_float64(backend, clamp, reduction):
    # the cpp op takes float64 too, so its own fused backward is gradchecked here
    shape = (3, 2, 5)
    mu = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    lv = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    if clamp:  # keep finite differences away from the clamp's kinks
        lv.data[(lv.data - clamp[0]).abs() < 1e-3] += 0.01
        lv.data[(lv.data - clamp[1]).abs() < 1e-3] += 0.01
    eps = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    fn = lambda a, b, c: reparameterize(a, b, c, logvar_clamp=clamp, reduction=reduction, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (mu, lv, eps))
    assert torch.autograd.gradcheck(lambda a, b: fn(a, b, eps.detach())[1], (mu, lv))


def test_cpp_backward_against_finite_differences_of_the_float64_reference():
    # the float32 kernel's gradient vs a central difference of the float64 reference
    mu, lv, eps = inputs((4, 9), torch.float32, requires_grad=True)
    z, kl = reparameterize(mu, lv, eps, backend="cpp")
    w = torch.randn(4, 9)
    g_mu, g_lv = torch.autograd.grad((z * w).sum() + kl.sum(), [mu, lv])

    def loss(m, l):
        zz, kk = reference.reparameterize_reference(m, l, eps.double())
        return float((zz * w.double()).sum() + kk.sum())

    h = 1e-6
    for grad, which in ((g_mu, 0), (g_lv, 1)):
        num = torch.empty(4, 9, dtype=torch.float64)
        for i in range(4):
            for j in range(9):
                args = [mu.detach().double(), lv.detach().double()]
                plus, minus = args[which].clone(), args[which].clone()
                plus[i, j] += h
                minus[i, j] -= h
                a_p, a_m = list(args), list(args)
                a_p[which], a_m[which] = plus, minus
                num[i, j] = (loss(*a_p) - loss(*a_m)) / (2 * h)
        assert_close(grad, num, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("bounds", [(None, None), (-1.0, 0.5), (None, 2.0)])
def test_opcheck(dtype, bounds):
    mu, lv, eps = inputs((3, 7), dtype, requires_grad=True)
    torch.library.opcheck(torch.ops.fastgen.reparameterize.default, (mu, lv, eps, *bounds))
    torch.library.opcheck(torch.ops.fastgen.reparameterize.default, (mu[:, None], lv[:, None], eps[:, None], *bounds))
    m, l = mu.detach(), lv.detach()
    kl_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    gz, gk = torch.randn(3, 7).to(dtype), torch.randn(3, dtype=kl_dtype)
    for args in ((gz, gk), (gz, None), (None, gk)):
        torch.library.opcheck(torch.ops.fastgen.reparameterize_backward.default, (*args, m, l, eps, *bounds))


@pytest.mark.skipif("triton" not in backends(), reason="triton cannot run here")
def test_opcheck_triton():
    mu, lv, eps = inputs((2, 5), torch.float32, requires_grad=True)
    op = torch.ops.fastgen.reparameterize_triton.default
    # the interpreter executes kernels even on fake tensors, so the fake-tensor and
    # aot tests only mean something (and only run) on a GPU
    utils = None if torch.cuda.is_available() else ("test_schema", "test_autograd_registration")
    if torch.cuda.is_available():
        mu, lv, eps = (t.detach().cuda().requires_grad_(t.requires_grad) for t in (mu, lv, eps))
    torch.library.opcheck(op, (mu, lv, eps, 0, -math.inf, math.inf), test_utils=utils or ALL_UTILS)
    torch.library.opcheck(op, (mu, lv, None, 123, -1.0, 1.0), test_utils=utils or ALL_UTILS)


def test_noncontiguous_inputs():
    mu, lv, eps = (t.t() for t in inputs((9, 5), torch.float32))
    assert not mu.is_contiguous()
    z, kl = reparameterize(mu, lv, eps, backend="cpp")
    _, _, z_ref, kl_ref = reference64(mu, lv, eps, None)
    assert_close(z, z_ref, rtol=1e-5, atol=1e-5)
    assert_close(kl, kl_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", backends())
def test_reduction(backend):
    mu, lv, eps = inputs((6, 11), torch.float32)
    _, kl = reparameterize(mu, lv, eps, backend=backend)
    _, s = reparameterize(mu, lv, eps, reduction="sum", backend=backend)
    _, m = reparameterize(mu, lv, eps, reduction="mean", backend=backend)
    assert s.dim() == 0 and m.dim() == 0
    assert_close(s, kl.sum(), 1e-6, 1e-6)
    assert_close(m, kl.mean(), 1e-6, 1e-6)


@pytest.mark.parametrize("backend", [b for b in backends() if b != "torch"])
def test_kl_accurate_near_the_prior(backend):
    # posterior close to the prior (tiny mu, logvar): exp(l) - l - 1 cancels in float32
    # unless computed as a series; the unfused expression loses most digits here
    mu = torch.randn(4, 300) * 1e-4
    lv = torch.randn(4, 300) * 1e-3
    _, kl = reparameterize(mu, lv, torch.zeros_like(mu), backend=backend)
    _, _, _, kl_ref = reference64(mu, lv, torch.zeros_like(mu), None)
    assert_close(kl, kl_ref, rtol=1e-4, atol=0)


@pytest.mark.parametrize("backend", backends())
def test_extreme_logvar(backend):
    lv = torch.tensor([[-170., -100., -88., -30., 0., 30., 80., 88., 100., 170.]])
    mu = torch.full_like(lv, 0.5)
    eps = torch.full_like(lv, -1.25)
    z, _ = reparameterize(mu, lv, eps, backend=backend)
    _, _, z_ref, _ = reference64(mu, lv, eps, None)
    assert_close(z, z_ref, rtol=1e-5, atol=1e-6)
    # exp(lv) overflows float32 above ~88.7: kl is inf like the unfused float32 expression
    _, kl = reparameterize(mu, lv, eps, backend=backend)
    assert torch.isinf(kl).all()
    _, kl = reparameterize(mu[:, :8], lv[:, :8], eps[:, :8], backend=backend)
    assert_close(kl, reference64(mu[:, :8], lv[:, :8], eps[:, :8], None)[3], rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", backends())
def test_clamp_bounds_values_and_zero_gradient(backend):
    lv = torch.tensor([[-50., -3., 0.2, 3., 50.]], requires_grad=True)
    mu = torch.zeros(1, 5)
    eps = torch.ones(1, 5)
    z, kl = reparameterize(mu, lv, eps, logvar_clamp=(-2.0, 2.0), backend=backend)
    expect = torch.exp(0.5 * torch.tensor([-2., -2., 0.2, 2., 2.]))
    assert_close(z[0], expect, 1e-6, 1e-6)
    (g,) = torch.autograd.grad(z.sum() + kl.sum(), [lv])
    assert g[0, [0, 1, 3, 4]].eq(0).all() and g[0, 2] != 0
    # one-sided clamp
    z, _ = reparameterize(mu, lv.detach(), eps, logvar_clamp=(None, 2.0), backend=backend)
    assert_close(z[0, :3], torch.exp(0.5 * torch.tensor([-50., -3., 0.2])), 1e-6, 1e-20)


def test_cpp_large_outputs():
    # >= 8 MiB outputs take the huge-page-advised allocation path of the C++ op
    mu, lv, eps = inputs((1100, 4001), torch.float32, requires_grad=True)
    z, kl = reparameterize(mu, lv, eps, backend="cpp")
    m, l, z_ref, kl_ref = reference64(mu, lv, eps, None)
    assert_close(z, z_ref, rtol=1e-5, atol=1e-5)
    assert_close(kl, kl_ref, rtol=1e-5, atol=1e-5)
    gz, gk = torch.randn(1100, 4001), torch.randn(1100)
    g = torch.autograd.grad([z, kl], [mu, lv], [gz, gk])
    r = torch.autograd.grad([z_ref, kl_ref], [m, l], [gz.double(), gk.double()])
    for a, b in zip(g, r):
        assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_cpp_same_bits_for_any_thread_count():
    mu, lv, eps = inputs((3, 50000), torch.float32)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        z1, kl1 = reparameterize(mu, lv, eps, backend="cpp")
        torch.set_num_threads(max(2, old))
        z2, kl2 = reparameterize(mu, lv, eps, backend="cpp")
    finally:
        torch.set_num_threads(old)
    assert torch.equal(z1, z2) and torch.equal(kl1, kl2)


# ---- the eps=None paths -------------------------------------------------------------


@pytest.mark.parametrize("backend", [b for b in backends() if b != "triton"])
def test_cpu_eps_from_generator_is_reproducible(backend):
    mu, lv, _ = inputs((4, 33), torch.float32)
    z1, kl1 = reparameterize(mu, lv, generator=torch.Generator().manual_seed(7), backend=backend)
    z2, _ = reparameterize(mu, lv, generator=torch.Generator().manual_seed(7), backend=backend)
    z3, _ = reparameterize(mu, lv, generator=torch.Generator().manual_seed(8), backend=backend)
    assert torch.equal(z1, z2) and not torch.equal(z1, z3)
    # the eps it drew is torch.randn from that generator: the same z as passing it
    eps = torch.randn(mu.shape, generator=torch.Generator().manual_seed(7))
    z4, kl4 = reparameterize(mu, lv, eps, backend=backend)
    assert torch.equal(z1, z4) and torch.equal(kl1, kl4)


def test_cpp_and_torch_draw_the_same_eps():
    mu, lv, _ = inputs((4, 33), torch.float32)
    zc, _ = reparameterize(mu, lv, generator=torch.Generator().manual_seed(3), backend="cpp")
    zt, _ = reparameterize(mu, lv, generator=torch.Generator().manual_seed(3), backend="torch")
    assert_close(zc, zt, 1e-6, 1e-6)


def test_default_generator_follows_manual_seed():
    mu, lv, _ = inputs((2, 9), torch.float32)
    torch.manual_seed(11)
    z1, _ = reparameterize(mu, lv)
    torch.manual_seed(11)
    z2, _ = reparameterize(mu, lv)
    assert torch.equal(z1, z2)


@pytest.mark.skipif("triton" not in backends(), reason="triton cannot run here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_in_kernel_eps(dtype):
    shape = (4, 3000)
    mu, lv, _ = inputs(shape, dtype, requires_grad=True)
    z1, kl1 = reparameterize(mu, lv, generator=torch.Generator().manual_seed(5), backend="triton")
    z2, _ = reparameterize(mu, lv, generator=torch.Generator().manual_seed(5), backend="triton")
    z3, _ = reparameterize(mu, lv, generator=torch.Generator().manual_seed(6), backend="triton")
    assert torch.equal(z1, z2) and not torch.equal(z1, z3)
    # kl does not depend on eps
    _, _, _, kl_ref = reference64(mu, lv, torch.zeros_like(mu), None)
    assert_close(kl1, kl_ref, 1e-5, 1e-5)
    gz = torch.randn(shape).to(dtype)
    g_mu, g_lv = torch.autograd.grad(z1, [mu, lv], gz)
    assert_close(g_mu, gz, 0, 0)
    if dtype != torch.float32:
        return  # z rounded to bfloat16 hides eps; the float32 case checks the values
    # the noise it used is standard normal (12000 draws: |mean| < 0.05, std within 5%)
    s = torch.exp(0.5 * lv.detach().double())
    eps_used = (z1.detach().double() - mu.detach().double()) / s
    assert abs(float(eps_used.mean())) < 0.05 and abs(float(eps_used.std()) - 1) < 0.05
    # the backward regenerated the same eps: d z / d logvar = 0.5 * s * eps
    assert_close(g_lv, 0.5 * gz.double() * s * eps_used, 1e-4, 1e-4)


# ---- bad input ------------------------------------------------------------------------


def test_errors_name_the_argument():
    mu, lv, eps = inputs((3, 4), torch.float32)
    with pytest.raises(ValueError, match="logvar has shape"):
        reparameterize(mu, lv[:, :3])
    with pytest.raises(ValueError, match="eps has shape"):
        reparameterize(mu, lv, eps[:2])
    with pytest.raises(TypeError, match="logvar is torch.float16 but mu is torch.float32"):
        reparameterize(mu, lv.half())
    with pytest.raises(TypeError, match="mu must be float32"):
        reparameterize(mu.long(), lv.long())
    with pytest.raises(TypeError, match="mu must be a torch.Tensor"):
        reparameterize([1.0], lv)
    with pytest.raises(ValueError, match="mu is empty"):
        reparameterize(mu[:0], lv[:0])
    with pytest.raises(ValueError, match="mu must have a batch dimension"):
        reparameterize(mu[0, 0], lv[0, 0])
    with pytest.raises(ValueError, match="reduction must be one of"):
        reparameterize(mu, lv, reduction="avg")
    with pytest.raises(ValueError, match="logvar_clamp min"):
        reparameterize(mu, lv, logvar_clamp=(3, -3))
    with pytest.raises(ValueError, match="logvar_clamp must be None or a"):
        reparameterize(mu, lv, logvar_clamp=5.0)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        reparameterize(mu, lv, generator=3)
    with pytest.raises(ValueError, match="backend must be one of"):
        reparameterize(mu, lv, backend="cuda9")


@pytest.mark.parametrize("name", ["mu", "logvar", "eps"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_check_finite(name, bad):
    args = dict(zip(["mu", "logvar", "eps"], inputs((3, 4), torch.float32)))
    args[name][1, 2] = bad
    with pytest.raises(ValueError, match=f"^{name} contains NaN or infinite values"):
        reparameterize(**args, check_finite=True)
    # off by default in the op: the bad value propagates instead of raising
    z, kl = reparameterize(**args)
    assert not torch.isfinite(z[1, 2])
    assert torch.isfinite(kl[1]) == (name == "eps")  # kl does not read eps


def test_cpp_op_checks_its_arguments_directly():
    mu, lv, eps = inputs((3, 4), torch.float32)
    op = torch.ops.fastgen.reparameterize
    with pytest.raises(RuntimeError, match="eps has shape"):
        op(mu, lv, eps[:, :2], None, None)
    with pytest.raises(RuntimeError, match="logvar is Half but mu is Float"):
        op(mu, lv.half(), eps, None, None)
    with pytest.raises(RuntimeError, match="mu must be float32"):
        op(mu.int(), lv.int(), eps.int(), None, None)
    with pytest.raises(RuntimeError, match="mu is empty"):
        op(mu[:0], lv[:0], eps[:0], None, None)
    with pytest.raises(RuntimeError, match="logvar_min"):
        op(mu, lv, eps, 1.0, -1.0)
    with pytest.raises(RuntimeError, match="grad_kl must have shape"):
        torch.ops.fastgen.reparameterize_backward(None, torch.ones(5), mu, lv, eps, None, None)
    with pytest.raises(RuntimeError, match="grad_z has shape"):
        torch.ops.fastgen.reparameterize_backward(torch.ones(2), None, mu, lv, eps, None, None)


def test_torch_compile():
    fn = torch.compile(lambda m, l, e: reparameterize(m, l, e, reduction="sum"), fullgraph=True)
    mu, lv, eps = inputs((5, 6), torch.float32, requires_grad=True)
    z, kl = fn(mu, lv, eps)
    g = torch.autograd.grad(z.sum() + kl, [mu, lv])
    z_e, kl_e = reparameterize(mu, lv, eps, reduction="sum")
    g_e = torch.autograd.grad(z_e.sum() + kl_e, [mu, lv])
    assert_close(z, z_e, 1e-6, 1e-6)
    assert_close(kl, kl_e, 1e-6, 1e-6)
    for a, b in zip(g, g_e):
        assert_close(a, b, 1e-6, 1e-6)


def test_double_backward_raises_clearly():
    from fastgen.ops import reparameterize
    mu = torch.randn(4, 3, requires_grad=True)
    lv = torch.randn(4, 3, requires_grad=True)
    z, kl = reparameterize(mu, lv, torch.randn(4, 3), backend="cpp")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(kl.sum(), lv, create_graph=True)


def test_raw_op_with_a_meta_input_raises():
    t = torch.randn(4, 3)
    with pytest.raises(ValueError, match="one device"):
        torch.ops.fastgen.reparameterize(t, t, torch.randn(4, 3, device="meta"), None, None)
