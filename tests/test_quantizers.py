"""The quantizer contract (fastgen/nn/quantizers.py) on every quantizer, VQVAE built with
each, and `fastgen train vqvae --quantizer` end to end (then a PixelCNN prior and samples)."""
import math

import pytest
import torch

from fastgen.cli import main
from fastgen.models import VQVAE
from fastgen.nn import FSQ, LFQ, QUANTIZERS, VectorQuantizer, VQOutput, make_quantizer

CONFIGS = {"vq": dict(num_codes=32, code_dim=6), "simvq": dict(num_codes=32, code_dim=6),
           "fsq": dict(levels=[8, 5, 5]), "lfq": dict(num_codes=64)}
TYPES = {"vq": VectorQuantizer, "simvq": VectorQuantizer, "fsq": FSQ, "lfq": LFQ}


@pytest.mark.parametrize("kind", QUANTIZERS)
@pytest.mark.parametrize("channel_last", [True, False])
def test_every_quantizer_keeps_the_contract(kind, channel_last):
    q = make_quantizer(kind, channel_last=channel_last, **CONFIGS[kind])
    assert isinstance(q, TYPES[kind])
    assert getattr(q, "simvq", False) == (kind == "simvq")
    d = q.dim
    torch.manual_seed(0)
    x = torch.randn(3, 5, 4, d) if channel_last else torch.randn(3, d, 5, 4)
    x.requires_grad_()
    q.train()
    out = q(x)
    assert isinstance(out, VQOutput)
    assert out.quantized.shape == x.shape and out.quantized.dtype == x.dtype
    assert out.indices.shape == (3, 5, 4) and out.indices.dtype == torch.long
    assert int(out.indices.min()) >= 0 and int(out.indices.max()) < q.num_codes
    assert all(v.dim() == 0 and v.dtype == torch.float32 for v in out.losses.values())
    assert 1.0 <= float(out.perplexity) <= q.num_codes
    (out.quantized.sum() + sum(out.losses.values())).backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())
    # decode_indices gives what forward returned for those codes, in the same layout
    q.eval()
    with torch.no_grad():
        again = q(x.detach())
    torch.testing.assert_close(q.decode_indices(again.indices), again.quantized)


@pytest.mark.parametrize("kind", QUANTIZERS)
def test_vqvae_with_each_quantizer(kind):
    torch.manual_seed(1)
    model = VQVAE((1, 8, 8), downsample=2, hidden=8, res_hidden=4, num_res_blocks=1, quantizer=kind,
                  **CONFIGS[kind])
    n = {"vq": 32, "simvq": 32, "fsq": 200, "lfq": 64}[kind]
    assert model.num_codes == n and model.config["quantizer"] == kind
    x = torch.rand(4, 1, 8, 8)
    out = model(x)
    out["loss"].backward()
    assert math.isfinite(float(out["loss"].detach())) and out["indices"].shape == (4, 4, 4)
    assert {"commitment", "codebook", "perplexity"} <= set(out)
    rebuilt = VQVAE(**model.config)           # what a checkpoint does
    rebuilt.load_state_dict(model.state_dict())
    assert torch.equal(rebuilt.encode(x), model.encode(x))
    assert model.decode(model.encode(x)).shape == x.shape


@pytest.mark.parametrize("bad,match", [
    (dict(quantizer="pq"), "quantizer must be one of"),
    (dict(quantizer="fsq"), "needs levels"),
    (dict(quantizer="lfq", num_codes=48), "power of two"),
    (dict(quantizer="fsq", levels=[4, 4], rotation_trick=True), "rotation_trick"),
    (dict(quantizer="lfq", num_codes=16, rotation_trick=True), "rotation_trick"),
])
def test_bad_quantizer_configs(bad, match):
    with pytest.raises(ValueError, match=match):
        VQVAE((1, 8, 8), **bad)


def test_vqvae_rotation_trick_trains_and_changes_the_gradient():
    torch.manual_seed(2)
    x = torch.rand(4, 1, 8, 8)
    grads = []
    for rot in (False, True):
        torch.manual_seed(3)
        m = VQVAE((1, 8, 8), hidden=8, res_hidden=4, num_res_blocks=1, num_codes=16, code_dim=4, ema=False,
                  kmeans_init=False, rotation_trick=rot)
        assert m.quantizer.rotation_trick is rot and m.config["rotation_trick"] is rot
        m(x)["loss"].backward()
        grads.append(m.encoder[0].weight.grad.clone())
    assert not torch.allclose(grads[0], grads[1])


def test_train_vqvae_with_fsq_then_a_prior_and_samples(tmp_path, capsys):
    quick = ["--epochs", "1", "--batches-per-epoch", "2", "--threads", "1", "--quiet"]
    tiny = ["--data", "digits", "--hidden", "16", "--res-blocks", "1"]
    assert main(["train", "vqvae", *tiny, "--quantizer", "fsq", "--levels", "5,3", "--out", str(tmp_path / "vq"),
                 *quick]) == 0
    ck = torch.load(tmp_path / "vq" / "checkpoint.pt", weights_only=False)
    assert ck["config"]["quantizer"] == "fsq" and ck["config"]["levels"] == [5, 3]
    assert main(["train", "pixelcnn", "--vqvae", str(tmp_path / "vq" / "checkpoint.pt"), "--prior-dim", "8",
                 "--prior-layers", "2", "--out", str(tmp_path / "prior"), *quick]) == 0
    out = tmp_path / "samples"
    assert main(["sample", "vqvae", "--prior", str(tmp_path / "prior" / "checkpoint.pt"), "--checkpoint",
                 str(tmp_path / "vq" / "checkpoint.pt"), "-n", "4", "--out", str(out)]) == 0
    assert any(p.suffix == ".png" and p.stat().st_size > 0 for p in out.rglob("*")) or \
        (out.suffix == ".png" and out.stat().st_size > 0)
    # a prior of the FSQ model against another FSQ run: refused (fingerprint of the decoder)
    assert main(["train", "vqvae", *tiny, "--quantizer", "fsq", "--levels", "5,3", "--seed", "7",
                 "--out", str(tmp_path / "vq2"), *quick]) == 0
    capsys.readouterr()
    assert main(["sample", "vqvae", "--prior", str(tmp_path / "prior" / "checkpoint.pt"), "--checkpoint",
                 str(tmp_path / "vq2" / "checkpoint.pt"), "-n", "2", "--out", str(tmp_path / "s2")]) != 0
    assert "another VQ model" in capsys.readouterr().err
    assert main(["train", "vqvae", *tiny, "--quantizer", "fsq", "--out", str(tmp_path / "x"), *quick]) != 0
    assert "--levels" in capsys.readouterr().err
    assert main(["train", "vqvae", *tiny, "--quantizer", "lfq", "--num-codes", "48", "--out", str(tmp_path / "y"),
                 *quick]) != 0
    assert "power of two" in capsys.readouterr().err


@pytest.mark.parametrize("kind", QUANTIZERS)
def test_vqvae2_with_each_quantizer(kind):
    from fastgen.models import build_model
    torch.manual_seed(4)
    model = build_model("vqvae2", dict(image_shape=(1, 16, 16), hidden=8, res_hidden=4, num_res_blocks=1,
                                       quantizer=kind, **CONFIGS[kind]))
    x = torch.rand(2, 1, 16, 16)
    out = model(x)
    out["loss"].backward()
    assert out["top"].shape == (2, 2, 2) and out["bottom"].shape == (2, 4, 4)
    assert int(out["top"].max()) < model.num_codes
    assert model.decode(*model.encode(x)).shape == x.shape


def test_train_vqvae2_with_lfq(tmp_path):
    quick = ["--epochs", "1", "--batches-per-epoch", "2", "--threads", "1", "--quiet"]
    assert main(["train", "vqvae2", "--data", "digits", "--size", "16", "--hidden", "8", "--res-blocks", "1",
                 "--quantizer", "lfq", "--num-codes", "32", "--out", str(tmp_path / "v2"), *quick]) == 0
    ck = torch.load(tmp_path / "v2" / "checkpoint.pt", weights_only=False)
    assert ck["config"]["quantizer"] == "lfq"


def test_fingerprints_tell_runs_apart_for_every_quantizer():
    """A prior checks the VQ model it was trained on by a fingerprint: codebook-free
    models (FSQ, LFQ, in VQVAE and VQVAE2) and SimVQ's learned map must change it."""
    from fastgen.models import build_model
    from fastgen.training import codebook_fingerprint
    for kind in ("vqvae", "vqvae2"):
        for q in QUANTIZERS:
            shape = (1, 8, 8) if kind == "vqvae" else (1, 16, 16)
            cfg = dict(image_shape=shape, hidden=8, res_hidden=4, num_res_blocks=1, quantizer=q, **CONFIGS[q])
            torch.manual_seed(0)
            a = build_model(kind, cfg)
            sd = {k: v.clone() for k, v in a.state_dict().items()}
            fa = codebook_fingerprint(sd)
            assert fa is not None, (kind, q)
            # a trained run differs in its learned weights; for simvq in the map only
            if q == "vq":
                name = next(k for k in sd if k.endswith("codebook"))
            elif q == "simvq":
                name = next(k for k in sd if ".code_map." in k)
            else:                                   # no codebook: any learned weight
                name = next(k for k in sd if k.endswith("weight"))
            sd[name] = sd[name] + 1
            assert codebook_fingerprint(sd) != fa, (kind, q, name)


def test_residual_vq_refuses_the_rotation_trick():
    from fastgen.nn import ResidualVQ
    with pytest.raises(ValueError, match="rotation_trick"):
        ResidualVQ(2, 8, 4, rotation_trick=True)


@pytest.mark.parametrize("kind,codes", [("fsq", ["--levels", "4,3"]), ("lfq", ["--num-codes", "16"])])
def test_a_transformer_prior_over_codebook_free_quantizers(tmp_path, kind, codes):
    """The DALL-E-style transformer reads any quantizer's codes: trained on an FSQ or LFQ
    VQ-VAE's code maps, it samples in-range codes that the VQ-VAE decodes."""
    quick = ["--epochs", "1", "--batches-per-epoch", "2", "--threads", "1", "--quiet"]
    vq = tmp_path / "vq"
    assert main(["train", "vqvae", "--data", "digits", "--hidden", "16", "--res-blocks", "1", "--quantizer", kind,
                 *codes, "--out", str(vq), *quick]) == 0
    tr = tmp_path / "tr"
    assert main(["train", "transformer", "--vqvae", str(vq / "checkpoint.pt"), "--dim", "16", "--layers", "1",
                 "--heads", "2", "--out", str(tr), *quick]) == 0
    s = tmp_path / "s"
    assert main(["sample", "transformer", "--checkpoint", str(tr / "checkpoint.pt"), "--prompt", "a seven",
                 "-n", "3", "--out", str(s)]) == 0
    saved = torch.load(s / "samples.pt", weights_only=True)
    assert saved["images"].shape[:2] == (3, 1) and bool(torch.isfinite(saved["images"]).all())


def test_lfq_entropy_weight_from_the_cli(tmp_path, capsys):
    quick = ["--epochs", "1", "--batches-per-epoch", "1", "--threads", "1", "--quiet"]
    tiny = ["--data", "digits", "--hidden", "16", "--res-blocks", "1"]
    assert main(["train", "vqvae", *tiny, "--quantizer", "lfq", "--num-codes", "16", "--entropy-weight", "0.7",
                 "--out", str(tmp_path / "a"), *quick]) == 0
    ck = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    assert ck["config"]["entropy_weight"] == 0.7
    from fastgen.training import model_from_checkpoint
    assert model_from_checkpoint(ck).quantizer.entropy_weight == 0.7
    capsys.readouterr()
    assert main(["train", "vqvae", *tiny, "--entropy-weight", "0.7", "--out", str(tmp_path / "b"), *quick]) != 0
    assert "--entropy-weight is for --quantizer lfq" in capsys.readouterr().err
    assert main(["train", "vqvae", *tiny, "--quantizer", "lfq", "--num-codes", "16", "--entropy-weight", "-1",
                 "--out", str(tmp_path / "c"), *quick]) != 0
    assert "--entropy-weight must be" in capsys.readouterr().err


@pytest.mark.parametrize("kw", [dict(quantizer="vq", stages=3), dict(quantizer="fsq", levels=[5, 3], stages=2),
                                dict(quantizer="lfq", num_codes=16, stages=2), dict(quantizer="vq", code_dim=16, groups=2),
                                dict(quantizer="fsq", levels=[5, 3], groups=2),
                                dict(quantizer="lfq", num_codes=16, groups=2)])
def test_several_codes_per_position_lie_side_by_side_in_the_code_map(kw):
    torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,))))
    m = VQVAE((1, 8, 8), hidden=16, res_hidden=8, num_res_blocks=1, **kw).eval()
    depth = kw.get("stages", 1) * kw.get("groups", 1)
    assert m.code_shape == (4, 4 * depth) and m.config.get("stages", 1) * m.config.get("groups", 1) == depth
    x = torch.rand(3, 1, 8, 8)
    codes = m.encode(x)
    raw = m.quantizer(m.encoder(x - 0.5)).indices                   # (B, h, w, depth)
    assert raw.shape == (3, 4, 4, depth)
    # position (i, j)'s codes are columns j*depth ... j*depth + depth - 1 of row i
    assert torch.equal(codes[:, 2, 3 * depth:4 * depth], raw[:, 2, 3])
    assert int(codes.max()) < m.num_codes
    # decode(encode(x)) is the forward's reconstruction
    with torch.no_grad():
        want = (m.decoder(m.quantizer(m.encoder(x - 0.5)).quantized) + 0.5).clamp(0, 1)
    torch.testing.assert_close(m.decode(codes), want)
    out = m.train()(x)
    out["loss"].backward()
    assert out["indices"].shape == (3, 4, 4 * depth)


def test_residual_vqvae_with_a_prior_and_a_transformer_from_the_cli(tmp_path, capsys):
    quick = ["--epochs", "1", "--batches-per-epoch", "2", "--threads", "1", "--quiet"]
    vq = tmp_path / "vq"
    assert main(["train", "vqvae", "--data", "digits", "--hidden", "16", "--res-blocks", "1", "--num-codes", "16",
                 "--stages", "2", "--out", str(vq), *quick]) == 0
    ck = torch.load(vq / "checkpoint.pt", weights_only=False)
    assert ck["config"]["stages"] == 2
    assert main(["train", "pixelcnn", "--vqvae", str(vq / "checkpoint.pt"), "--prior-dim", "8", "--prior-layers", "2",
                 "--out", str(tmp_path / "p"), *quick]) == 0
    assert torch.load(tmp_path / "p" / "checkpoint.pt", weights_only=False)["config"]["code_shape"] == (4, 8)
    assert main(["sample", "vqvae", "--checkpoint", str(vq / "checkpoint.pt"), "--prior",
                 str(tmp_path / "p" / "checkpoint.pt"), "-n", "3", "--out", str(tmp_path / "s")]) == 0
    assert torch.load(tmp_path / "s" / "samples.pt", weights_only=True)["images"].shape == (3, 1, 8, 8)
    assert main(["train", "transformer", "--vqvae", str(vq / "checkpoint.pt"), "--dim", "16", "--layers", "1",
                 "--heads", "2", "--out", str(tmp_path / "t"), *quick]) == 0
    capsys.readouterr()
    for bad, msg in ((["--stages", "2", "--groups", "2"], "do not combine"), (["--groups", "0"], "--groups must be")):
        assert main(["train", "vqvae", "--data", "digits", "--hidden", "16", "--out", str(tmp_path / "x"), *bad,
                     *quick]) != 0
        assert msg in capsys.readouterr().err
    assert main(["train", "vqvae2", "--data", "digits", "--size", "32", "--hidden", "16", "--stages", "2",
                 "--out", str(tmp_path / "y"), *quick]) != 0
    assert "options of `fastgen train vqvae`" in capsys.readouterr().err
