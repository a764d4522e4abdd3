"""fastgen.models.VQVAE / GatedPixelCNN and `fastgen train vqvae|pixelcnn`,
`fastgen sample vqvae` end to end on CI-sized runs (seconds)."""
import json
import os

import pytest
import torch
from PIL import Image

from fastgen.cli import main
from fastgen.models import VQVAE, GatedPixelCNN, build_model

QUICK = ["--threads", "1", "--quiet"]


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# ---- models ------------------------------------------------------------------------------

def test_pixelcnn_is_causal_in_raster_order_and_has_no_blind_spot():
    h, w, k = 5, 6, 7
    net = GatedPixelCNN(k, (h, w), dim=8, layers=4, kernel=3, num_classes=3).double()
    codes = torch.randint(k, (2, h, w))
    labels = torch.randint(3, (2,))
    base = net.logits(codes, labels)
    for p in torch.randperm(h * w)[:10].tolist():
        changed = codes.clone().view(2, -1)
        changed[:, p:] = (changed[:, p:] + 1 + torch.randint(k - 1, changed[:, p:].shape)) % k
        diff = (net.logits(changed.view(2, h, w), labels) - base).abs().amax(1).view(2, -1)
        assert diff[:, :p + 1].max() == 0, f"position <= {p} saw a code at or after {p}"
        if (p + 1) % w:   # the next position in the same row sees its left neighbour
            assert diff[:, p + 1].max() > 0, f"position {p + 1} does not see position {p}"
    # no blind spot: (i, j) sees the code up and to the right, (i - 1, j + 1)
    i, j = 2, 3
    changed = codes.clone()
    changed[:, i - 1, j + 1] = (changed[:, i - 1, j + 1] + 1) % k
    assert (net.logits(changed, labels) - base)[:, :, i, j].abs().max() > 0
    # labels matter
    assert (net.logits(codes, (labels + 1) % 3) - base).abs().max() > 0


def test_pixelcnn_rows_up_to_i_give_row_i():
    net = GatedPixelCNN(9, (6, 4), dim=8, layers=3).double()
    codes = torch.randint(9, (3, 6, 4))
    full = net.logits(codes)
    for i in range(6):
        torch.testing.assert_close(net.logits(codes[:, :i + 1])[:, :, i], full[:, :, i])


def test_pixelcnn_sample_shapes_and_errors():
    net = GatedPixelCNN(5, (3, 3), dim=8, layers=2, num_classes=2)
    codes = net.sample(4, labels=torch.tensor([0, 1, 0, 1]), generator=torch.Generator().manual_seed(0))
    assert codes.shape == (4, 3, 3) and codes.dtype == torch.long and 0 <= codes.min() and codes.max() < 5
    with pytest.raises(ValueError, match="labels"):
        net.logits(codes)
    with pytest.raises(ValueError, match="codes must be in"):
        net.logits(codes + 5, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="codes must be an integer"):
        net.logits(codes.float(), torch.zeros(4, dtype=torch.long))


def test_vqvae_shapes_gradients_and_round_trip():
    model = VQVAE((1, 8, 8), downsample=2, hidden=16, res_hidden=8, num_codes=12, code_dim=4)
    x = torch.rand(6, 1, 8, 8)
    out = model(x)
    assert out["indices"].shape == (6, 4, 4) and out["recon"].shape == (6,)
    out["loss"].backward()
    assert all(p.grad is not None for p in model.encoder.parameters())   # straight-through reaches the encoder
    idx = model.encode(x)
    assert torch.equal(model.decode(idx), model.reconstruct(x))
    copy = build_model("vqvae", model.config)
    copy.load_state_dict(model.state_dict())
    assert torch.equal(copy.encode(x), idx)
    with pytest.raises(ValueError, match="downsample"):
        VQVAE((1, 8, 8), downsample=3)
    with pytest.raises(ValueError, match="x must be"):
        model(torch.rand(2, 3, 8, 8))


# ---- end to end: train vqvae -> train pixelcnn -> sample --------------------------------

def test_train_vqvae_pixelcnn_and_sample(tmp_path, capsys):
    vq, px, smp = (str(tmp_path / d) for d in ("vq", "px", "samples"))
    assert main(["train", "vqvae", "--data", "digits", "--epochs", "3", "--out", vq, "--batches-per-epoch", "12",
                 "--hidden", "32", "--num-codes", "32", "--code-dim", "8", *QUICK]) == 0
    rows = metrics(vq)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert rows[-1]["test_mse"] < rows[0]["test_mse"]
    assert rows[-1]["codes_used"] > 1
    with Image.open(os.path.join(vq, "reconstructions.png")) as im:
        assert im.size[0] > 64 and im.size[1] > 64

    assert main(["train", "pixelcnn", "--vqvae", os.path.join(vq, "checkpoint.pt"), "--epochs", "3", "--out", px,
                 "--batches-per-epoch", "12", "--prior-dim", "16", "--prior-layers", "3", "--lr", "3e-3",
                 *QUICK]) == 0
    rows = metrics(px)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert rows[-1]["test_bits_per_code"] < 5.0   # log2(32) = 5 bits: the prior beats uniform
    assert os.path.getsize(os.path.join(px, "samples.png")) > 0

    assert main(["sample", "vqvae", "--checkpoint", os.path.join(vq, "checkpoint.pt"),
                 "--prior", os.path.join(px, "checkpoint.pt"), "--out", smp, "-n", "9"]) == 0
    saved = torch.load(os.path.join(smp, "samples.pt"))
    assert saved["images"].shape == (9, 1, 8, 8) and saved["codes"].shape == (9, 4, 4)
    assert os.path.getsize(os.path.join(smp, "samples.png")) > 0
    for folder in (vq, px, smp):
        assert not [f for f in os.listdir(folder) if f.startswith(".tmp-")]

    # clear one-line errors, not tracebacks
    capsys.readouterr()
    assert main(["train", "pixelcnn", "--epochs", "1", "--out", str(tmp_path / "x"), *QUICK]) == 2
    assert "--vqvae" in capsys.readouterr().err
    assert main(["sample", "vqvae", "--checkpoint", os.path.join(vq, "checkpoint.pt"), "--out", smp]) == 2
    assert "--prior" in capsys.readouterr().err
    assert main(["train", "pixelcnn", "--vqvae", os.path.join(px, "checkpoint.pt"), "--epochs", "1",
                 "--out", str(tmp_path / "y"), *QUICK]) == 2
    assert "not a vqvae" in capsys.readouterr().err


def test_train_vqvae_resume_continues(tmp_path):
    out = str(tmp_path / "vq")
    args = ["train", "vqvae", "--data", "digits", "--out", out, "--batches-per-epoch", "3", "--hidden", "16",
            "--num-codes", "16", "--code-dim", "4", "--max-test", "32", *QUICK]
    assert main([*args, "--epochs", "1"]) == 0
    assert main([*args, "--epochs", "1"]) == 2   # exists, no --resume
    assert main([*args, "--epochs", "2", "--resume"]) == 0
    assert [r["epoch"] for r in metrics(out)] == [1, 2]
