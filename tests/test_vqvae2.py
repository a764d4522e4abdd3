"""VQ-VAE-2 (two code levels), its priors, incremental sampling and the commands."""
import json

import pytest
import torch

from fastgen.cli import main
from fastgen.models import GatedPixelCNN
from fastgen.models.vqvae2 import VQVAE2, BottomPrior


def test_shapes_and_decoding():
    m = VQVAE2((3, 64, 64), hidden=32, res_hidden=16, num_codes=32, code_dim=8)
    x = torch.rand(4, 3, 64, 64)
    out = m(x)
    assert out["top"].shape == (4, 8, 8) and out["bottom"].shape == (4, 16, 16)
    out["loss"].backward()
    top, bottom = m.encode(x)
    both = m.decode(top, bottom)
    assert both.shape == x.shape and torch.equal(both, m.reconstruct(x))
    assert float(both.min()) >= 0 and float(both.max()) <= 1


def test_loss_falls_on_digits():
    from fastgen.data import load_digits
    torch.manual_seed(0)
    x = load_digits(size=32).train[:256]
    m = VQVAE2((1, 32, 32), hidden=32, res_hidden=16, num_codes=64, code_dim=16)
    opt = torch.optim.Adam(m.parameters(), lr=2e-3)
    m.eval()
    with torch.no_grad():
        first = float(m(x)["mse"])
    m.train()
    for step in range(60):
        out = m(x[(step * 32) % 256:(step * 32) % 256 + 32])      # one forward per step (EMA codes update once)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    m.eval()
    with torch.no_grad():
        assert float(m(x)["mse"]) < 0.6 * first


@pytest.mark.parametrize("kw", [dict(), dict(num_classes=3), dict(cond_channels=4), dict(attention=True),
                                dict(attention="every", num_classes=3, dropout=0.3),
                                dict(attention="every", cond_channels=4)])
def test_incremental_sampling_draws_the_naive_samplers_codes(kw):
    # left in training mode: sampling must switch dropout off itself (and give the mode back)
    net = GatedPixelCNN(13, (5, 6), dim=12, layers=3, kernel=5, **kw).train()
    n = 6
    labels = torch.tensor([0, 1, 2, 0, 1, 2]) if "num_classes" in kw else None
    cond = torch.randn(n, 4, 5, 6) if "cond_channels" in kw else None
    seed = int(torch.randint(0, 2 ** 31, (1,)))
    a = net.sample(n, labels=labels, cond=cond, generator=torch.Generator().manual_seed(seed), temperature=0.8)
    b = net.sample_naive(n, labels=labels, cond=cond, generator=torch.Generator().manual_seed(seed), temperature=0.8)
    assert torch.equal(a, b) and net.training


def _past_codes_seen(net, codes, i, j):
    """Which code positions the logits at (i, j) depend on (gradient through the embeddings)."""
    x = net.embed(codes).permute(0, 3, 1, 2).detach().requires_grad_(True)
    v = h = x
    ctx = net.layer_attention[0].shifted(x) if net.layer_attention is not None else None
    for li, layer in enumerate(net.layers):
        v, h = layer(v, h)
        if net.layer_attention is not None:
            h = net.layer_attention[li](h, ctx)
    if net.attention is not None:
        h = net.attention(h)
    net.head(h)[0, :, i, j].sum().backward()
    return x.grad[0].abs().sum(0) > 0


def test_attention_in_every_layer_sees_the_whole_past_and_nothing_else():
    H, W = 9, 9
    codes = torch.randint(0, 7, (1, H, W))
    past = torch.arange(H * W).reshape(H, W) < H * W - 1        # every position before the last
    torch.manual_seed(0)
    every = _past_codes_seen(GatedPixelCNN(7, (H, W), dim=8, layers=2, attention="every").double(), codes, H - 1, W - 1)
    assert torch.equal(every, past)
    # the convolutions alone reach a window of the past only (this test can fail)
    plain = _past_codes_seen(GatedPixelCNN(7, (H, W), dim=8, layers=2).double(), codes, H - 1, W - 1)
    assert plain.sum() < past.sum() and not (plain & ~past).any()
    # a middle position: the past only
    mid = _past_codes_seen(GatedPixelCNN(7, (H, W), dim=8, layers=2, attention="every").double(), codes, 4, 3)
    assert torch.equal(mid, torch.arange(H * W).reshape(H, W) < 4 * W + 3)


def test_dropout_acts_in_training_only():
    net = GatedPixelCNN(7, (4, 4), dim=8, layers=2, dropout=0.5)
    codes = torch.randint(0, 7, (2, 4, 4))
    torch.manual_seed(1)
    a = net.logits(codes)
    assert not torch.equal(a, net.logits(codes))
    net.eval()
    assert torch.equal(net.logits(codes), net.logits(codes))
    with pytest.raises(ValueError, match="dropout"):
        GatedPixelCNN(7, (4, 4), dropout=1.0)
    with pytest.raises(ValueError, match="attention"):
        GatedPixelCNN(7, (4, 4), attention="all")


def test_bottom_prior_conditioning_stack_widens_what_each_position_reads():
    torch.manual_seed(0)
    top = torch.randint(0, 16, (1, 4, 4))
    bottom = torch.randint(0, 16, (1, 8, 8))

    def top_seen(p):
        emb = p.embed_top(top).detach().requires_grad_(True)
        cmap = p.up(p.cond_stack(emb.permute(0, 3, 1, 2)))
        p.pixelcnn.logits(bottom, cond=cmap)[0, :, 0, 0].sum().backward()
        return int((emb.grad[0].abs().sum(-1) > 0).sum())
    assert top_seen(BottomPrior(16, (8, 8), dim=8, layers=1, cond_dim=4, cond_blocks=2)) > \
        top_seen(BottomPrior(16, (8, 8), dim=8, layers=1, cond_dim=4))
    p = BottomPrior(16, (8, 8), dim=8, layers=2, cond_dim=4, cond_blocks=1, attention="every", dropout=0.1)
    seed = int(torch.randint(0, 2 ** 31, (1,)))
    a = p.sample(torch.randint(0, 16, (3, 4, 4)), generator=torch.Generator().manual_seed(seed))
    assert a.shape == (3, 8, 8)
    with pytest.raises(ValueError, match="cond_blocks"):
        BottomPrior(16, (8, 8), cond_blocks=-1)


def test_conditioning_map_reaches_every_position_and_only_the_past_codes():
    net = GatedPixelCNN(7, (4, 4), dim=8, layers=3, cond_channels=2).double()
    codes = torch.randint(0, 7, (1, 4, 4))
    cond = torch.randn(1, 2, 4, 4, dtype=torch.double, requires_grad=True)
    net.logits(codes, cond=cond)[0, :, 2, 1].sum().backward()
    assert cond.grad[0, :, 2, 1].abs().sum() > 0          # the map at the position itself
    # causality w.r.t. codes is unchanged: position (2, 1) does not see code (2, 1) or later
    emb = net.embed
    x = emb(codes).permute(0, 3, 1, 2).detach().requires_grad_(True)
    v = h = x
    for layer in net.layers:
        v, h = layer(v, h, None, cond.detach())
    net.head(h)[0, :, 2, 1].sum().backward()
    g = x.grad[0].abs().sum(0)
    assert g[2, 1] == 0 and g[2, 2:].sum() == 0 and g[3].sum() == 0 and g[1].sum() > 0


def test_attention_is_causal():
    net = GatedPixelCNN(7, (4, 5), dim=8, layers=2, attention=True).double()
    codes = torch.randint(0, 7, (1, 4, 5))
    x = net.embed(codes).permute(0, 3, 1, 2).detach().requires_grad_(True)
    v = h = x
    for layer in net.layers:
        v, h = layer(v, h)
    net.head(net.attention(h))[0, :, 2, 1].sum().backward()
    g = x.grad[0].abs().sum(0)
    assert g[2, 1] == 0 and g[2, 2:].sum() == 0 and g[3].sum() == 0 and g[0].sum() > 0


def test_bottom_prior_packs_and_checks():
    p = BottomPrior(16, (8, 8), dim=8, layers=2, cond_dim=4)
    b, t = torch.randint(0, 16, (3, 8, 8)), torch.randint(0, 16, (3, 4, 4))
    rows = p.pack(b, t)
    assert rows.shape == (3, 80)
    assert torch.equal(p(rows)["loss"], p(b, t)["loss"])
    with pytest.raises(ValueError, match="packed rows must be"):
        p(torch.zeros(3, 70, dtype=torch.long))
    with pytest.raises(ValueError, match="top codes must be"):
        p(b, torch.zeros(3, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="cond must be"):
        p.pixelcnn.sample(2, cond=torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="cond .* is required"):
        p.pixelcnn.logits(b)


def test_bad_inputs():
    with pytest.raises(ValueError, match="divisible by 8"):
        VQVAE2((1, 28, 28))
    m = VQVAE2((1, 32, 32), hidden=16, res_hidden=8, num_codes=8, code_dim=4)
    with pytest.raises(ValueError, match="top codes must be an integer"):
        m.decode(torch.zeros(2, 8, 8, dtype=torch.long), torch.zeros(2, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"bottom codes must be in \[0, 8\)"):
        m.decode(torch.zeros(2, 4, 4, dtype=torch.long), torch.full((2, 8, 8), 9))
    with pytest.raises(ValueError, match="top has 2 maps but bottom has 3"):
        m.decode(torch.zeros(2, 4, 4, dtype=torch.long), torch.zeros(3, 8, 8, dtype=torch.long))


def test_commands_end_to_end(tmp_path, capsys):
    fast = ["--epochs", "1", "--batches-per-epoch", "3", "--quiet"]
    vq = str(tmp_path / "vq")
    assert main(["train", "vqvae2", "--data", "digits", "--size", "32", "--hidden", "16", "--num-codes", "32",
                 "--code-dim", "8", "--out", vq, *fast]) == 0
    assert (tmp_path / "vq" / "reconstructions.png").is_file()
    for level in ("top", "bottom"):
        assert main(["train", "prior", "--vqvae2", vq + "/checkpoint.pt", "--level", level, "--prior-dim", "8",
                     "--prior-layers", "2", "--out", str(tmp_path / level), *fast]
                    + (["--attention", "--class-conditional"] if level == "top" else ["--attention", "every", "--cond-blocks", "1",
                                                                 "--dropout", "0.1"])) == 0
    # a run recorded when --attention was a switch (flags attention=True) resumes
    top_ck = tmp_path / "top" / "checkpoint.pt"
    ck = torch.load(top_ck, weights_only=False)
    ck["flags"]["attention"] = True
    torch.save(ck, top_ck)
    assert main(["train", "prior", "--resume", "--out", str(tmp_path / "top"), "--epochs", "2", "--quiet"]) == 0
    # resuming without --level reads it from the checkpoint
    assert main(["train", "prior", "--resume", "--prior-dim", "8", "--prior-layers", "2", "--out",
                 str(tmp_path / "bottom"), "--epochs", "2", "--batches-per-epoch", "3", "--quiet"]) == 0
    rows = [json.loads(line) for line in open(tmp_path / "bottom" / "metrics.jsonl")]
    assert [r["epoch"] for r in rows] == [1, 2]
    out = str(tmp_path / "s")
    assert main(["sample", "vqvae2", "--checkpoint", vq + "/checkpoint.pt", "--top-prior",
                 str(tmp_path / "top" / "checkpoint.pt"), "--bottom-prior", str(tmp_path / "bottom" / "checkpoint.pt"),
                 "-n", "5", "--label", "1,2", "--out", out]) == 0
    saved = torch.load(out + "/samples.pt", weights_only=True)
    assert saved["images"].shape == (5, 1, 32, 32) and saved["labels"].tolist() == [1, 2, 1, 2, 1]
    assert (tmp_path / "s" / "reconstructions.png").is_file()
    # the transformer over VQ-VAE-2 codes (top map then bottom map: 16 + 64 tokens)
    tr = str(tmp_path / "tr")
    assert main(["train", "transformer", "--vqvae2", vq + "/checkpoint.pt", "--dim", "16", "--layers", "1",
                 "--heads", "2", "--out", tr, *fast]) == 0
    assert main(["sample", "transformer", "--checkpoint", tr + "/checkpoint.pt", "--prompt", "a two", "-n", "2",
                 "--out", str(tmp_path / "ts")]) == 0
    assert torch.load(tmp_path / "ts" / "samples.pt", weights_only=True)["images"].shape == (2, 1, 32, 32)
    capsys.readouterr()
    # the priors swapped: refused, naming the flag
    assert main(["sample", "vqvae2", "--checkpoint", vq + "/checkpoint.pt", "--top-prior",
                 str(tmp_path / "bottom" / "checkpoint.pt"), "--bottom-prior", str(tmp_path / "top" / "checkpoint.pt"),
                 "-n", "2", "--out", out]) == 2
    assert "--top-prior" in capsys.readouterr().err
    assert main(["train", "vqvae2", "--data", "digits", "--size", "12", "--out", str(tmp_path / "v8"), *fast]) == 2
    assert "divisible by 8" in capsys.readouterr().err
    assert main(["train", "prior", "--vqvae2", vq + "/checkpoint.pt", "--out", str(tmp_path / "p"), *fast]) == 2
    assert "--level" in capsys.readouterr().err
