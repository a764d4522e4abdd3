"""fastgen.nn.VectorQuantizer / ResidualVQ against the textbook layer
(reference.vector_quantize_reference: full distance matrix + one-hot, float64 EMA).

Fresh random inputs each run (conftest seeds from os.urandom and prints the seed).
"""
import os
import tempfile

import pytest
import torch
import torch.nn.functional as F

from fastgen.nn import ResidualVQ, VectorQuantizer
from fastgen.ops import reference
from helpers import assert_close, assert_equal_idx, free_port, init_gloo

SHAPES = [(1, 1, 1), (7, 3, 5), (123, 16, 37), (300, 64, 512)]   # (N, D, K)


def _codebook(vq):
    return vq.codebook.detach().clone()


class ReferenceVQ:
    """The straightforward layer, step by step: full distance matrix, one-hot, one-hot
    statistics (float64), the same EMA rule and pseudo-count initial state."""

    def __init__(self, codebook, ema, decay=0.99, eps=1e-5, commitment=0.25):
        self.codebook = codebook.detach().double().clone()
        self.cluster_size = torch.ones(codebook.shape[0], dtype=torch.float64)
        self.embed_sum = self.codebook.clone()
        self.ema, self.decay, self.eps, self.commitment = ema, decay, eps, commitment

    def step(self, rows):
        x = rows.detach().double().requires_grad_()
        cb = self.codebook.clone().requires_grad_(not self.ema)
        z_q, idx, commit, cb_loss, one_hot = reference.vector_quantize_reference(x, cb, self.commitment)
        if self.ema:
            self.cluster_size, self.embed_sum, self.codebook = reference.vq_ema_update_reference(
                x.detach(), one_hot.detach(), self.cluster_size, self.embed_sum, self.decay, self.eps)
        return x, cb, z_q, idx, commit, cb_loss, one_hot


@pytest.mark.parametrize("n,d,k", SHAPES)
def test_codebook_loss_mode_matches_reference(n, d, k):
    vq = VectorQuantizer(k, d, commitment=0.3)
    vq.codebook.data = torch.randn(k, d)
    ref = ReferenceVQ(vq.codebook, ema=False, commitment=0.3)
    x = torch.randn(n, d, requires_grad=True)
    w = torch.randn(n, d)
    out = vq(x)
    rx, rcb, rzq, ridx, rcommit, rcb_loss, _ = ref.step(x)
    assert_equal_idx(out.indices, ridx)
    assert_close(out.quantized, rzq, 1e-6, 1e-6)
    assert_close(out.losses["commitment"], rcommit, 1e-5, 1e-7)
    assert_close(out.losses["codebook"], rcb_loss, 1e-5, 1e-7)
    # gradients: straight-through into x plus the commitment term; codebook loss into the codes
    ((out.quantized * w).sum() + sum(out.losses.values())).backward()
    ((rzq * w.double()).sum() + rcommit + rcb_loss).backward()
    assert_close(x.grad, rx.grad, 1e-5, 1e-6)
    assert_close(vq.codebook.grad, rcb.grad, 1e-5, 1e-6)


@pytest.mark.parametrize("n,d,k", SHAPES)
def test_ema_matches_one_hot_reference(n, d, k):
    vq = VectorQuantizer(k, d, ema=True, decay=0.9, eps=1e-3)
    ref = ReferenceVQ(vq.codebook, ema=True, decay=0.9, eps=1e-3)
    for step in range(4):
        x = torch.randn(n, d) + 0.1 * step
        out = vq(x)
        _, _, rzq, ridx, rcommit, _, one_hot = ref.step(x)
        assert_equal_idx(out.indices, ridx)
        assert_close(out.quantized, rzq, 1e-6, 1e-6)
        assert_close(out.losses["commitment"], rcommit, 1e-5, 1e-7)
        assert float(out.losses["codebook"]) == 0.0
        assert_close(vq.cluster_size, ref.cluster_size, 1e-5, 1e-6)
        assert_close(vq.embed_sum, ref.embed_sum, 1e-5, 1e-5)
        assert_close(vq.codebook, ref.codebook, 1e-4, 1e-5)
        # usage and perplexity from the same counts the one-hot gives
        counts = one_hot.sum(0)
        p = counts / counts.sum()
        ppl = torch.exp(-(p * torch.log(p.clamp_min(1e-300))).sum())
        assert_close(out.perplexity, ppl, 1e-5, 1e-6)
    assert int(vq.usage.sum()) == 4 * n


def test_ema_codebook_is_a_buffer_and_gets_no_gradient():
    vq = VectorQuantizer(16, 4, ema=True)
    assert not any(p is vq.codebook for p in vq.parameters())
    x = torch.randn(50, 4, requires_grad=True)
    out = vq(x)
    (out.quantized.sum() + sum(out.losses.values())).backward()
    assert x.grad is not None and vq.codebook.grad is None


def test_straight_through_gradient_is_identity_plus_commitment():
    vq = VectorQuantizer(32, 8, commitment=0.0)
    x = torch.randn(4, 5, 8, requires_grad=True)
    w = torch.randn(4, 5, 8)
    (vq(x).quantized * w).sum().backward()
    assert torch.equal(x.grad, w)
    # beta * d/dx mean((x - sg(q))^2) = beta * 2 (x - q) / numel
    vq.commitment = 0.5
    x.grad = None
    out = vq(x)
    out.losses["commitment"].backward()
    q = out.quantized.detach()
    assert_close(x.grad, 0.5 * 2 * (x.detach() - q) / x.numel(), 1e-5, 1e-8)


def test_channel_first_equals_channel_last():
    last = VectorQuantizer(20, 6, ema=True)
    first = VectorQuantizer(20, 6, ema=True, channel_last=False)
    first.load_state_dict(last.state_dict())
    x = torch.randn(3, 6, 5, 7)
    a = first(x)
    b = last(x.permute(0, 2, 3, 1))
    assert a.quantized.shape == x.shape and a.indices.shape == (3, 5, 7)
    assert_equal_idx(a.indices, b.indices)
    assert torch.equal(a.quantized, b.quantized.permute(0, 3, 1, 2))
    assert torch.equal(first.codebook, last.codebook)


def test_projection_when_dims_differ():
    vq = VectorQuantizer(24, 4, input_dim=10, channel_last=False)
    x = torch.randn(2, 10, 3, 3, requires_grad=True)
    out = vq(x)
    assert out.quantized.shape == x.shape
    rows = x.detach().permute(0, 2, 3, 1).reshape(-1, 10)
    with torch.no_grad():
        z = vq.project_in(rows)
        _, idx, _, _, _ = reference.vector_quantize_reference(z, vq.codebook)
        want = vq.project_out(vq.codebook[idx]).view(2, 3, 3, 10).permute(0, 3, 1, 2)
    assert_equal_idx(out.indices.reshape(-1), idx)
    assert_close(out.quantized, want, 1e-6, 1e-6)
    (out.quantized.sum() + sum(out.losses.values())).backward()
    assert vq.project_in.weight.grad.abs().sum() > 0 and vq.project_out.weight.grad.abs().sum() > 0
    assert torch.equal(vq.decode_indices(out.indices), out.quantized.detach())


def test_cosine_mode_picks_the_most_similar_code():
    vq = VectorQuantizer(40, 8, cosine=True)
    x = torch.randn(100, 8) * torch.rand(100, 1) * 50   # norms must not matter
    out = vq(x)
    sim = F.normalize(x, dim=1) @ F.normalize(vq.codebook.detach(), dim=1).t()
    assert torch.equal(out.indices, sim.argmax(1))
    assert_close(out.quantized.norm(dim=1), torch.ones(100), 1e-5, 1e-5)
    ema = VectorQuantizer(40, 8, cosine=True, ema=True)
    ema(x)
    assert_close(ema.codebook.norm(dim=1), torch.ones(40), 1e-5, 1e-5)


def test_dead_code_reset_reseeds_from_encoder_outputs():
    for ema in (False, True):
        vq = VectorQuantizer(8, 3, ema=ema, dead_code_threshold=2)
        cb = torch.full((8, 3), 1000.0)   # every code but 0 far from the data
        cb[0] = 0
        vq.codebook.data.copy_(cb)
        if ema:
            vq.embed_sum.copy_(cb)
        x = torch.randn(64, 3)
        vq(x)                                        # step 1: codes 1..7 unused once
        assert (vq.codebook[1:] == 1000).all() if not ema else (vq.codebook[1:] > 100).all()
        vq(x)                                        # step 2: threshold reached -> re-seeded
        fresh = vq.codebook[1:]
        assert (vq.unused_steps == 0).all()
        # each re-seeded code is one of this batch's encoder outputs
        match = (fresh[:, None, :] == x[None]).all(-1).any(1)
        assert match.all(), f"ema={ema}: re-seeded codes {fresh} are not rows of the batch"
        out = vq(x)
        assert out.indices.unique().numel() > 1


def test_kmeans_init_lowers_distortion_and_is_used_once():
    torch.manual_seed(1234)
    centers = torch.randn(6, 5) * 10
    x = centers[torch.randint(6, (600,))] + torch.randn(600, 5)
    distortion = {}
    for iters in (0, 10):
        torch.manual_seed(99)   # the same initial sample for both
        vq = VectorQuantizer(6, 5, ema=True, kmeans_init=True, kmeans_iters=iters)
        out = vq(x)
        assert bool(vq.initialized)
        distortion[iters] = float(out.losses["commitment"]) / vq.commitment
    assert distortion[10] < distortion[0]
    before = _codebook(vq)
    vq.eval()
    vq(x + 100)   # eval: no init, no update
    assert torch.equal(vq.codebook, before)


def test_eval_mode_does_not_update():
    vq = VectorQuantizer(16, 4, ema=True, dead_code_threshold=1).eval()
    before = {k: v.clone() for k, v in vq.state_dict().items() if k != "usage"}
    vq(torch.randn(30, 4))
    for k, v in before.items():
        assert torch.equal(vq.state_dict()[k], v), k


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(dtype):
    vq = VectorQuantizer(50, 12, ema=True)
    x = torch.randn(2, 9, 12).to(dtype).requires_grad_()
    ref = ReferenceVQ(vq.codebook, ema=True)
    before = _codebook(vq)
    out = vq(x)
    _, _, rzq, ridx, _, _, _ = ref.step(x.reshape(-1, 12))
    assert out.quantized.dtype == dtype and out.losses["commitment"].dtype == torch.float32
    assert_equal_idx(out.indices.reshape(-1), ridx)
    assert torch.equal(out.quantized.reshape(-1, 12), before[ridx].to(dtype))   # the code itself
    out.quantized.float().sum().backward()
    assert x.grad.dtype == dtype and torch.equal(x.grad, torch.ones_like(x))
    vq2 = VectorQuantizer(50, 4, input_dim=12)
    assert vq2(x).quantized.dtype == dtype


def test_state_dict_round_trip():
    vq = VectorQuantizer(32, 6, input_dim=9, ema=True, kmeans_init=True, dead_code_threshold=3,
                         channel_last=False)
    for _ in range(3):
        vq(torch.randn(4, 9, 5, 5))
    copy = VectorQuantizer(32, 6, input_dim=9, ema=True, kmeans_init=True, dead_code_threshold=3,
                           channel_last=False)
    copy.load_state_dict(vq.state_dict())
    for k, v in vq.state_dict().items():
        assert torch.equal(copy.state_dict()[k], v), k
    x = torch.randn(2, 9, 4, 4)
    # training mode: the same EMA update (and dead-code picks with the same RNG), no second k-means
    torch.manual_seed(7)
    a = vq(x)
    torch.manual_seed(7)
    b = copy(x)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.quantized, b.quantized)
    assert torch.equal(vq.codebook, copy.codebook)
    for name in ("num_codes=32", "dim=6", "input_dim=9", "ema(decay=0.99", "dead_code_threshold=3"):
        assert name in repr(vq), name

    rvq = ResidualVQ(3, 16, 4, ema=True)
    rvq(torch.randn(50, 4))
    rcopy = ResidualVQ(3, 16, 4, ema=True)
    rcopy.load_state_dict(rvq.state_dict())
    x = torch.randn(20, 4)
    assert torch.equal(rvq.eval()(x).quantized, rcopy.eval()(x).quantized)


def test_residual_vq_stages_quantize_the_remainder():
    rvq = ResidualVQ(4, 64, 8, input_dim=8, kmeans_init=True, ema=True)
    x = torch.randn(500, 8, requires_grad=True)
    out = rvq(x)
    assert out.indices.shape == (500, 4)
    # stage i quantizes what stages < i left: the error of the partial sums falls
    with torch.no_grad():
        partial = torch.zeros(500, 8)
        err = []
        for i, stage in enumerate(rvq.stages):
            partial = partial + stage.codebook[out.indices[:, i]]
            err.append(float((x - partial).square().mean()))
    assert err[-1] < err[0], err
    rvq.eval()
    out = rvq(x)
    assert_close(rvq.decode_indices(out.indices), out.quantized.detach(), 1e-6, 1e-6)
    out.quantized.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_bad_inputs_name_the_argument():
    vq = VectorQuantizer(8, 4)
    with pytest.raises(ValueError, match="input_dim=4"):
        vq(torch.randn(3, 5))
    with pytest.raises(ValueError, match="channel_last=False"):
        VectorQuantizer(8, 4, channel_last=False)(torch.randn(2, 3, 4))
    with pytest.raises(TypeError, match="x must be float32"):
        vq(torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        vq([[1.0, 2.0, 3.0, 4.0]])
    with pytest.raises(ValueError, match="x is empty"):
        vq(torch.randn(0, 4))
    with pytest.raises(ValueError, match="NaN"):
        vq(torch.tensor([[0.0, float("nan"), 0.0, 0.0]]))
    with pytest.raises(ValueError, match="num_codes"):
        VectorQuantizer(0, 4)
    with pytest.raises(TypeError, match="dim"):
        VectorQuantizer(8, 4.0)
    with pytest.raises(ValueError, match="decay"):
        VectorQuantizer(8, 4, ema=True, decay=1.0)
    with pytest.raises(ValueError, match="eps"):
        VectorQuantizer(8, 4, eps=0.0)
    with pytest.raises(ValueError, match="commitment"):
        VectorQuantizer(8, 4, commitment=-1.0)
    with pytest.raises(ValueError, match="dead_code_threshold"):
        VectorQuantizer(8, 4, dead_code_threshold=0)
    with pytest.raises(ValueError, match="backend"):
        VectorQuantizer(8, 4, backend="cuda-magic")
    with pytest.raises(ValueError, match="precision"):
        VectorQuantizer(8, 4, precision="fp8")
    with pytest.raises(ValueError, match="indices"):
        vq.decode_indices(torch.tensor([8]))
    with pytest.raises(ValueError, match="num_quantizers"):
        ResidualVQ(0, 8, 4)


# ---- torch.distributed: 2 gloo ranks on 127.0.0.1 --------------------------------------


def _batches(seed, steps, n, d):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2 * n, d, generator=g) + 0.2 * t for t in range(steps)]


def _ddp_worker(rank, port, folder, seed, steps, n, d, k):
    torch.set_num_threads(1)
    init_gloo(rank, port)
    try:
        results = {}
        for name, kw in (("ema", dict(ema=True)), ("all", dict(ema=True, kmeans_init=True, dead_code_threshold=1)),
                         ("loss", dict(dead_code_threshold=1))):
            torch.manual_seed(seed)          # the same initial codebook on both ranks
            vq = VectorQuantizer(k, d, **kw)
            torch.manual_seed(seed + 1 + rank)   # but different local randomness
            for x in _batches(seed, steps, n, d):
                vq(x[rank * n:(rank + 1) * n])
            results[name] = {key: v.clone() for key, v in vq.state_dict().items()}
        torch.save(results, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_statistics_give_the_same_codebook_on_every_rank():
    import torch.multiprocessing as mp
    seed, steps, n, d, k = int(torch.randint(1 << 30, ())), 3, 200, 6, 32
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_ddp_worker, args=(free_port(), folder, seed, steps, n, d, k), nprocs=2, join=True)
        r0, r1 = (torch.load(os.path.join(folder, f"rank{r}.pt")) for r in (0, 1))
    for name in r0:
        for key in r0[name]:
            if key != "usage":   # usage counts are global too, but check the state that matters
                assert torch.equal(r0[name][key], r1[name][key]), f"{name}: {key} differs between ranks"
    # one process on the concatenated batch: the same EMA statistics and codebook
    torch.manual_seed(seed)
    single = VectorQuantizer(k, d, ema=True)
    for x in _batches(seed, steps, n, d):
        single(x)
    for key in ("cluster_size", "embed_sum", "codebook"):
        assert_close(r0["ema"][key], single.state_dict()[key], 1e-5, 1e-5)
    assert torch.equal(r0["ema"]["usage"], single.usage)


# --- the rotation trick ---------------------------------------------------------------------

def _rotation_grad64(z, q, g):
    """float64 s R^T g per row, from the rotation trick's formula (Fifty et al. 2024)."""
    z, q, g = z.double(), q.double(), g.double()
    out = []
    for zi, qi, gi in zip(z, q, g):
        e, qh = zi / zi.norm(), qi / qi.norm()
        r = (e + qh) / (e + qh).norm()
        R = torch.eye(len(zi), dtype=torch.float64) - 2 * torch.outer(r, r) + 2 * torch.outer(qh, e)
        out.append(qi.norm() / zi.norm() * R.T @ gi)
    return torch.stack(out)


def test_rotation_trick_value_and_gradient_match_the_formula():
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 6, rotation_trick=True)
    with torch.no_grad():
        vq.codebook.copy_(torch.randn(16, 6))
    z = torch.randn(40, 6, requires_grad=True)
    out = vq(z)
    q = vq.codebook.detach()[out.indices]
    assert torch.equal(out.quantized, q)                        # the code itself
    g = torch.randn(40, 6)
    (out.quantized * g).sum().backward()
    torch.testing.assert_close(z.grad.double(), _rotation_grad64(z.detach(), q, g), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(z.grad, g)                        # not straight-through


def test_rotation_trick_degenerate_rows_pass_straight_through():
    from fastgen.nn.vector_quantizer import rotate_onto
    z = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 1.0]], requires_grad=True)
    q = torch.tensor([[1.0, 1.0], [-3.0, 0.0], [1.0, 2.0]])
    out = rotate_onto(z, q)
    out.sum().backward()
    assert torch.equal(z.grad[:2], torch.ones(2, 2))           # z = 0, and q opposite to z
    torch.testing.assert_close(out[2], q[2])
    with pytest.raises(TypeError, match="rotation_trick"):
        VectorQuantizer(4, 2, rotation_trick="yes")


# --- SimVQ ------------------------------------------------------------------------------------

def test_simvq_codes_are_the_frozen_basis_through_the_learned_map():
    torch.manual_seed(1)
    vq = VectorQuantizer(64, 8, simvq=True)
    z = torch.randn(300, 8, requires_grad=True)
    out = vq(z)
    codes = (vq.codebook.double() @ vq.code_map.weight.double().T)
    want = torch.cdist(z.detach().double(), codes).argmin(1)
    assert torch.equal(out.indices, want)
    torch.testing.assert_close(out.quantized.double(), codes[want], rtol=1e-5, atol=1e-6)
    basis = vq.codebook.clone()
    opt = torch.optim.SGD(vq.parameters(), lr=0.5)
    before = vq.code_map.weight.detach().clone()
    (out.losses["codebook"] + out.losses["commitment"]).backward()
    assert "codebook" not in dict(vq.named_parameters())        # frozen: a buffer
    opt.step()
    assert torch.equal(vq.codebook, basis) and not torch.equal(vq.code_map.weight, before)
    assert torch.equal(vq.decode_indices(out.indices), vq._codes().detach()[out.indices])


@pytest.mark.parametrize("bad", [dict(ema=True), dict(kmeans_init=True), dict(dead_code_threshold=5)])
def test_simvq_refuses_what_it_replaces(bad):
    with pytest.raises(ValueError, match="simvq"):
        VectorQuantizer(8, 4, simvq=True, **bad)
    with pytest.raises(TypeError, match="simvq"):
        VectorQuantizer(8, 4, simvq=1)
