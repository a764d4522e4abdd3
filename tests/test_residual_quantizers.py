"""fastgen.nn.ResidualFSQ / ResidualLFQ / ResidualQuantizer against float64 references of
the stage recursion and against vector-quantize-pytorch's ResidualFSQ / ResidualLFQ."""
import pytest
import torch

from fastgen.nn import FSQ, ResidualFSQ, ResidualLFQ, ResidualQuantizer
from test_fsq import reference as fsq_reference


def residual_fsq_reference(x, levels, q):
    """float64: r_0 = x; stage s: c_s = FSQ(r_s / L^-s) * L^-s, r_{s+1} = r_s - c_s."""
    L = torch.tensor(levels, dtype=torch.float64)
    r, total, idx = x.double(), 0, []
    for s in range(q):
        scale = L ** -s
        codes, index, _ = fsq_reference(r / scale, levels)
        c = codes * scale
        r, total = r - c, total + c
        idx.append(index)
    return total, torch.stack(idx, -1)


@pytest.mark.parametrize("levels,q", [([8, 5, 5, 5], 1), ([8, 5, 5, 5], 3), ([7, 5, 5, 5, 5], 2), ([3], 4)])
def test_residual_fsq_matches_the_float64_recursion(levels, q):
    torch.manual_seed(q)
    x = torch.randn(300, len(levels)) * 0.7
    out = ResidualFSQ(levels, q)(x)
    want, idx = residual_fsq_reference(x, levels, q)
    # rounding boundaries can differ by one step between float32 and float64 in a later
    # stage; on these draws there are none
    assert torch.equal(out.indices, idx)
    torch.testing.assert_close(out.quantized.double(), want, rtol=1e-5, atol=1e-6)


def test_more_stages_approximate_better_and_decode_to_the_output():
    torch.manual_seed(1)
    x = torch.rand(500, 4) * 1.6 - 0.8
    errs = []
    for q in (1, 2, 3):
        layer = ResidualFSQ([8, 5, 5, 5], q).eval()
        out = layer(x)
        errs.append(float((out.quantized - x).abs().mean()))
        torch.testing.assert_close(layer.decode_indices(out.indices), out.quantized)
    assert errs[0] > 3 * errs[1] and errs[1] > 1.5 * errs[2]


def test_gradient_is_each_stages_estimator_summed():
    torch.manual_seed(2)
    x = torch.randn(50, 3, requires_grad=True)
    layer = ResidualFSQ([8, 6, 5], 2)
    layer(x).quantized.sum().backward()
    # by hand: stage s's straight-through gradient is its bound's derivative at r_s / scale_s
    x64 = x.detach().double()
    L = torch.tensor([8.0, 6.0, 5.0], dtype=torch.float64)
    grad, r = 0, x64
    for s in range(2):
        scale = L ** -s
        inp = (r / scale).requires_grad_()
        half_l = (L - 1) * (1 + 1e-3) / 2
        offset = torch.where(L % 2 == 0, 0.5, 0.0).double()
        b = torch.tanh(inp + torch.atanh(offset / half_l)) * half_l - offset
        (b / torch.floor(L / 2) * scale).sum().backward()
        grad = grad + inp.grad / scale
        codes, _, _ = fsq_reference(r / scale, [8, 6, 5])
        r = r - codes * scale
    torch.testing.assert_close(x.grad.double(), grad, rtol=1e-4, atol=1e-6)


def test_residual_lfq_sums_halving_sign_codes():
    torch.manual_seed(3)
    x = torch.randn(200, 5)
    layer = ResidualLFQ(5, 3).eval()
    out = layer(x)
    r, total = x.double(), 0
    for s in range(3):
        c = torch.where(r > 0, 2.0 ** -s, -(2.0 ** -s))
        r, total = r - c, total + c
    torch.testing.assert_close(out.quantized.double(), total.double())
    torch.testing.assert_close(layer.decode_indices(out.indices), out.quantized)


def test_channel_first_layout():
    torch.manual_seed(4)
    x = torch.randn(2, 4, 3, 3)
    a = ResidualFSQ([8, 5, 5, 5], 2, channel_last=False)(x)
    b = ResidualFSQ([8, 5, 5, 5], 2)(x.movedim(1, -1))
    assert torch.equal(a.indices, b.indices) and a.indices.shape == (2, 3, 3, 2)
    assert torch.equal(a.quantized.movedim(1, -1), b.quantized)


@pytest.mark.parametrize("bad,err,match", [
    (lambda: ResidualFSQ([8, 5], 0), ValueError, "num_quantizers"),
    (lambda: ResidualQuantizer([], []), ValueError, "at least one"),
    (lambda: ResidualQuantizer([FSQ([8, 5]), FSQ([8, 5, 5])], [1.0, 1.0]), ValueError, "same dim"),
    (lambda: ResidualQuantizer([FSQ([8, 5])], [1.0, 2.0]), ValueError, "scales"),
    (lambda: ResidualQuantizer([FSQ([8, 5], channel_last=False)], [1.0]), ValueError, "channel-last"),
    (lambda: ResidualLFQ(4, 2, codebook_scale=1.0), ValueError, "codebook_scale"),
    (lambda: ResidualQuantizer([FSQ([8, 5]), FSQ([8, 5])], [1.0, 0.0]), ValueError, "finite and > 0"),
    (lambda: ResidualQuantizer([FSQ([8, 5])], [float("nan")]), ValueError, "finite and > 0"),
    (lambda: ResidualFSQ([8, 5], 2).decode_indices(torch.zeros(3, 3, dtype=torch.long)), ValueError,
     "num_quantizers=2"),
])
def test_bad_inputs(bad, err, match):
    with pytest.raises(err, match=match):
        bad()


def test_same_outputs_as_vector_quantize_pytorch():
    """ResidualLFQ: the same codes and sums as the peer's. (The peer's ResidualFSQ runs
    its symmetry-preserving FSQ variant in every stage, not the paper's FSQ that
    fastgen's stages are: their codes differ by design.)"""
    peer = pytest.importorskip("vector_quantize_pytorch",
                               reason="vector-quantize-pytorch is a test dependency (make test installs it)")
    torch.manual_seed(5)
    x = torch.randn(2, 300, 6)
    theirs = peer.ResidualLFQ(dim=6, codebook_size=64, num_quantizers=3).eval()
    q, idx, _ = theirs(x)
    out = ResidualLFQ(6, 3).eval()(x)
    assert torch.equal(out.indices, idx)
    torch.testing.assert_close(out.quantized, q)
