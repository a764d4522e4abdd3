"""fastgen.nn.LFQ against a float64 reference of MAGVIT-v2's formula (the full 2^d softmax)."""
import math

import pytest
import torch

from fastgen.nn import LFQ
from fastgen.nn import lfq as lfq_module


def reference(z, inv_temperature=100.0, scale=1.0, gamma=1.0):
    """float64: codes, indices (first channel most significant), per-sample entropy and
    batch entropy of softmax(-inv_temperature ||z - c||^2) over all 2^d codes."""
    z = z.double()
    d = z.shape[-1]
    codes = torch.tensor([[scale if (c >> (d - 1 - i)) & 1 else -scale for i in range(d)] for c in range(1 << d)],
                         dtype=torch.float64)
    q = torch.where(z > 0, scale, -scale).double()
    idx = ((z > 0).long() * 2 ** torch.arange(d - 1, -1, -1)).sum(-1)
    prob = torch.softmax(-inv_temperature * torch.cdist(z, codes).square(), dim=-1)
    per_sample = -(prob * torch.log(prob.clamp_min(1e-300))).sum(-1).mean()
    avg = prob.mean(0)
    batch = -(avg * torch.log(avg.clamp_min(1e-300))).sum()
    return q, idx, per_sample - gamma * batch


@pytest.mark.parametrize("d,temp,scale", [(1, 100.0, 1.0), (3, 1.0, 1.0), (5, 100.0, 1.0), (6, 3.0, 0.5),
                                          (8, 0.3, 2.0)])
def test_forward_and_entropy_match_the_float64_formula(d, temp, scale):
    torch.manual_seed(d)
    z = torch.randn(211, d) * 0.2
    layer = LFQ(d, inv_temperature=temp, codebook_scale=scale, entropy_weight=1.0).train()
    out = layer(z)
    q, idx, ent = reference(z, temp, scale)
    assert torch.equal(out.indices, idx)
    assert torch.equal(out.quantized.double(), q)
    torch.testing.assert_close(out.losses["entropy"].double(), ent, rtol=1e-4, atol=1e-5)
    assert torch.equal(layer.decode_indices(idx), q.float())


@pytest.mark.parametrize("d,gamma", [(4, 1.0), (7, 0.5)])
def test_entropy_gradient_matches_the_float64_formula(d, gamma):
    torch.manual_seed(10 + d)
    z = (torch.randn(97, d) * 0.05).requires_grad_()
    layer = LFQ(d, inv_temperature=10.0, diversity_gamma=gamma, entropy_weight=1.0).train()
    layer(z).losses["entropy"].backward()
    z64 = z.detach().double().requires_grad_()
    reference(z64, 10.0, 1.0, gamma)[2].backward()
    torch.testing.assert_close(z.grad.double(), z64.grad, rtol=2e-3, atol=1e-6)


def test_blocks_of_rows_give_the_same_entropy_and_gradient(monkeypatch):
    """The batch entropy in blocks of a few rows (as for 2^20 codes) equals one block."""
    torch.manual_seed(3)
    z = torch.randn(300, 6) * 0.1
    res = []
    for elems in (1 << 22, 64 * 5):           # one block; blocks of 5 rows
        monkeypatch.setattr(lfq_module, "_BLOCK_ELEMS", elems)
        zz = z.clone().requires_grad_()
        loss = LFQ(6, inv_temperature=5.0, entropy_weight=1.0).train()(zz).losses["entropy"]
        loss.backward()
        res.append((loss.detach(), zz.grad))
    torch.testing.assert_close(res[0][0], res[1][0])
    torch.testing.assert_close(res[0][1], res[1][1])


def test_straight_through_and_commitment():
    torch.manual_seed(4)
    z = torch.randn(50, 4, requires_grad=True)
    out = LFQ(4, entropy_weight=0.0, commitment_weight=0.25).train()(z)
    (out.quantized * torch.arange(4.0)).sum().backward()
    assert torch.equal(z.grad, torch.arange(4.0).expand(50, 4))     # identity through the sign
    q = torch.where(z > 0, 1.0, -1.0)
    torch.testing.assert_close(out.losses["commitment"], 0.25 * (z.detach() - q).square().mean())


def test_eval_mode_has_no_losses_and_every_code_is_reachable():
    layer = LFQ(5).eval()
    codes = layer.decode_indices(torch.arange(32))
    out = layer(codes * 0.3)
    assert torch.equal(out.indices, torch.arange(32))
    assert float(out.losses["entropy"]) == 0.0 and float(out.losses["commitment"]) == 0.0
    assert math.isclose(float(out.perplexity), 32.0, rel_tol=1e-5)


def test_channel_first_and_half_inputs():
    torch.manual_seed(5)
    x = torch.randn(2, 6, 3, 4)
    a = LFQ(6, channel_last=False)(x)
    b = LFQ(6)(x.movedim(1, -1))
    assert torch.equal(a.indices, b.indices) and torch.equal(a.quantized.movedim(1, -1), b.quantized)
    h = LFQ(6)(x.movedim(1, -1).to(torch.bfloat16))
    assert h.quantized.dtype == torch.bfloat16


@pytest.mark.parametrize("bad,err,match", [
    (lambda: LFQ(0), ValueError, "dim"),
    (lambda: LFQ(2.0), ValueError, "dim"),
    (lambda: LFQ(24), ValueError, "entropy_weight=0"),
    (lambda: LFQ(4, inv_temperature=0), ValueError, "inv_temperature"),
    (lambda: LFQ(4, entropy_weight=-1), ValueError, "entropy_weight"),
    (lambda: LFQ(4, codebook_scale=float("nan")), ValueError, "codebook_scale"),
    (lambda: LFQ(4)(torch.randn(3, 5)), ValueError, "input_dim=4"),
    (lambda: LFQ(4)(torch.randn(3, 4, dtype=torch.float64)), TypeError, "float32"),
    (lambda: LFQ(4)(torch.tensor([[float("inf"), 0.0, 0.0, 0.0]])), ValueError, "non-finite"),
    (lambda: LFQ(4).decode_indices(torch.tensor([16])), ValueError, r"\[0, 16\)"),
    (lambda: LFQ(4).decode_indices(torch.tensor([1.0])), TypeError, "int64"),
])
def test_bad_inputs_name_the_argument(bad, err, match):
    with pytest.raises(err, match=match):
        bad()


def test_large_code_count_without_the_penalty():
    out = LFQ(40, entropy_weight=0.0)(torch.randn(64, 40))
    assert out.indices.max() < 2 ** 40 and float(out.perplexity) > 1


@pytest.mark.parametrize("d", [4, 10])
def test_same_outputs_as_vector_quantize_pytorch(d):
    peer = pytest.importorskip("vector_quantize_pytorch",
                               reason="vector-quantize-pytorch is a test dependency (make test installs it)")
    torch.manual_seed(6)
    x = torch.randn(2, 300, d) * 0.05
    theirs = peer.LFQ(dim=d, codebook_size=2 ** d, entropy_loss_weight=0.1).train()
    (q, idx, aux), parts = theirs(x, return_loss_breakdown=True)
    ours = LFQ(d).train()(x)
    assert torch.equal(ours.indices, idx)
    assert torch.equal(ours.quantized, q)
    # the peer clamps probabilities at 1e-5 inside its logarithms: close, not equal
    torch.testing.assert_close(ours.losses["entropy"], aux, rtol=2e-2, atol=2e-3)
