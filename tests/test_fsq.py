"""fastgen.nn.FSQ against a float64 reference of the paper's formula."""
import math

import pytest
import torch

from fastgen.nn import FSQ

PAPER_LEVELS = [[8, 6, 5], [8, 5, 5, 5], [7, 5, 5, 5, 5], [8, 8, 8, 6, 5], [8, 8, 8, 5, 5, 5]]


def reference(z, levels):
    """Mentzer et al. 2024, float64: bound, round, scale; index by mixed radix (half range
    (L - 1)(1 + 1e-3) / 2, vector-quantize-pytorch's choice; see fastgen/nn/fsq.py)."""
    L = torch.tensor(levels, dtype=torch.float64)
    z = z.double()
    half_l = (L - 1) * (1 + 1e-3) / 2
    offset = torch.where(L % 2 == 0, 0.5, 0.0).double()
    bounded = torch.tanh(z + torch.atanh(offset / half_l)) * half_l - offset
    rounded = torch.round(bounded)
    half_width = torch.floor(L / 2)
    digits = (rounded + half_width).long()
    index = torch.zeros(z.shape[:-1], dtype=torch.long)
    weight = 1
    for i, lv in enumerate(levels):
        index += digits[..., i] * weight
        weight *= lv
    return rounded / half_width, index, bounded


@pytest.mark.parametrize("levels", PAPER_LEVELS + [[2], [3, 4]])
def test_forward_matches_the_float64_formula(levels):
    torch.manual_seed(len(levels))
    z = torch.randn(37, 5, len(levels)) * 3
    out = FSQ(levels)(z)
    codes, index, bounded = reference(z, levels)
    # where float32 and float64 round a value on a .5 boundary differently the code may
    # differ by one step; there are none on random inputs away from the boundary
    near = ((bounded - bounded.floor()) - 0.5).abs() < 1e-5
    ok = ~near.any(-1)
    assert ok.float().mean() > 0.99
    assert torch.equal(out.indices[ok], index[ok])
    assert torch.allclose(out.quantized[ok].double(), codes[ok], atol=1e-6)
    assert out.losses == {}
    assert out.indices.shape == z.shape[:-1] and out.quantized.shape == z.shape


@pytest.mark.parametrize("levels", [[8, 6, 5], [7, 5, 5, 5, 5], [2, 2, 3]])
def test_every_code_is_reachable_and_decodes_to_itself(levels):
    fsq = FSQ(levels)
    every = torch.arange(fsq.num_codes)
    codes = fsq.decode_indices(every)
    assert codes.shape == (math.prod(levels), len(levels))
    assert codes.abs().max() <= 1
    # a value inside each code's interval, pushed back through the bound's inverse, lands on it
    half_l = (fsq._levels - 1) * (1 + 1e-3) / 2
    offset = torch.where(fsq._levels % 2 == 0, 0.5, 0.0)
    grid = codes * torch.div(fsq._levels, 2, rounding_mode="floor")
    target = grid - 0.3 * grid.sign()          # inside each code's rounding interval
    z = torch.atanh((target + offset) / half_l) - torch.atanh(offset / half_l)
    out = fsq(z)
    assert torch.equal(out.indices, every)
    assert torch.allclose(out.quantized, codes)
    assert torch.isclose(out.perplexity, torch.tensor(float(fsq.num_codes)), rtol=1e-4)


def test_straight_through_gradient_is_the_bounds_derivative():
    levels = [8, 5, 5, 5]
    z = (torch.randn(64, 4) * 2).double()
    zz = z.float().requires_grad_()
    g = torch.randn(64, 4)
    (FSQ(levels)(zz).quantized * g).sum().backward()
    L = torch.tensor(levels, dtype=torch.float64)
    half_l = (L - 1) * (1 + 1e-3) / 2
    offset = torch.where(L % 2 == 0, 0.5, 0.0).double()
    t = torch.tanh(z + torch.atanh(offset / half_l))
    want = g.double() * half_l * (1 - t ** 2) / torch.floor(L / 2)
    assert torch.allclose(zz.grad.double(), want, rtol=1e-4, atol=1e-6)


def test_channel_first_and_half_inputs():
    torch.manual_seed(1)
    x = torch.randn(2, 3, 4, 5)
    a = FSQ([8, 6, 5], channel_last=False)(x)
    b = FSQ([8, 6, 5])(x.movedim(1, -1))
    assert torch.equal(a.indices, b.indices)
    assert torch.equal(a.quantized.movedim(1, -1), b.quantized)
    h = FSQ([8, 6, 5])(x.movedim(1, -1).to(torch.bfloat16))
    assert h.quantized.dtype == torch.bfloat16 and h.indices.dtype == torch.long


@pytest.mark.parametrize("bad,err,match", [
    (lambda: FSQ([]), ValueError, "levels"),
    (lambda: FSQ([8, 1]), ValueError, "levels"),
    (lambda: FSQ([8, 2.5]), ValueError, "levels"),
    (lambda: FSQ([8, 5])(torch.randn(4, 3)), ValueError, "input_dim=2"),
    (lambda: FSQ([8, 5])(torch.randn(4, 2, dtype=torch.float64)), TypeError, "float32"),
    (lambda: FSQ([8, 5])(torch.tensor([[float("nan"), 0.0]])), ValueError, "non-finite"),
    (lambda: FSQ([8, 5])(torch.randn(0, 2)), ValueError, "empty"),
    (lambda: FSQ([8, 5]).decode_indices(torch.tensor([40])), ValueError, r"\[0, 40\)"),
    (lambda: FSQ([8, 5]).decode_indices(torch.tensor([1.0])), TypeError, "int64"),
])
def test_bad_inputs_name_the_argument(bad, err, match):
    with pytest.raises(err, match=match):
        bad()


@pytest.mark.parametrize("levels", PAPER_LEVELS)
def test_same_codes_as_vector_quantize_pytorch(levels):
    peer = pytest.importorskip("vector_quantize_pytorch",
                               reason="vector-quantize-pytorch is a test dependency (make test installs it)")
    torch.manual_seed(2)
    x = torch.randn(4, 500, len(levels)) * 2
    q, idx = peer.FSQ(levels=levels)(x)
    out = FSQ(levels)(x)
    assert torch.equal(out.indices, idx)
    assert torch.allclose(out.quantized, q)


def test_a_huge_implicit_codebook_counts_usage_without_a_slot_per_code():
    """prod(levels) = 1000^5: the usage count must not allocate 10^15 slots."""
    torch.manual_seed(7)
    out = FSQ([1000] * 5)(torch.randn(64, 5))
    assert out.indices.max() < 1000 ** 5 and 1.0 <= float(out.perplexity) <= 64
