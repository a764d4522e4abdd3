"""`fastgen train` / `fastgen sample` end to end on CI-sized runs, plus the data,
image-grid and checkpoint helpers they stand on."""
import json
import os

import pytest
import torch
from PIL import Image

from fastgen import data as datasets
from fastgen import training
from fastgen.cli import main
from fastgen.images import save_grid, to_grid

PNGS = ("reconstructions.png", "samples.png", "interpolations.png")
QUICK = ["--threads", "1", "--quiet", "--max-test", "64"]


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def train(*args):
    vae_only = ["--iwae-k", "4"] if args[0] == "vae" else []
    return main(["train", *args, *QUICK, *vae_only])


@pytest.mark.parametrize("command, has, lacks", [
    (["train", "ae"], ["--latent-dim", "--loss", "--data"], ["--iwae-k", "--beta", "--num-codes", "--vqvae"]),
    (["train", "vae"], ["--iwae-k", "--beta", "--likelihood"], ["--loss", "--num-codes", "--prior-dim"]),
    (["train", "vqvae"], ["--num-codes", "--dead-code-threshold", "--data"], ["--latent-dim", "--iwae-k", "--vqvae"]),
    (["train", "pixelcnn"], ["--vqvae", "--prior-layers"], ["--data", "--num-codes", "--latent-dim"]),
    (["sample", "vae"], ["--checkpoint", "-n"], ["--prior", "--temperature"]),
    (["sample", "vqvae"], ["--prior", "--temperature"], ["--latent-dim"]),
])
def test_each_model_shows_only_its_own_flags(capsys, command, has, lacks):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert all(f in text for f in has), text
    assert not [f for f in lacks if f in text], text


# ---- end to end ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["vae", "ae"])
def test_train_on_digits_loss_falls_and_files_appear(tmp_path, kind, capsys):
    out = str(tmp_path / kind)
    assert train(kind, "--data", "digits", "--epochs", "3", "--out", out) == 0
    rows = metrics(out)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert rows[-1]["test_loss"] < rows[0]["test_loss"]
    for name in PNGS + ("checkpoint.pt",):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    with Image.open(os.path.join(out, "samples.png")) as im:
        assert im.size[0] > 64 and im.size[1] > 64
    if kind == "vae":
        # the test-set bound on log p(x) is reported and improves
        assert rows[-1]["test_iwae_nats"] > rows[0]["test_iwae_nats"]
        assert rows[-1]["test_iwae_bits_per_dim"] < rows[0]["test_iwae_bits_per_dim"]
        assert "bits/dim" in capsys.readouterr().out
    assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]  # no temporary files left


def test_resume_continues_exactly(tmp_path):
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    args = ["vae", "--data", "digits", "--batches-per-epoch", "5", "--eval-every", "9"]
    assert train(*args, "--epochs", "3", "--out", full) == 0
    assert train(*args, "--epochs", "2", "--out", split) == 0
    assert training.load_checkpoint(os.path.join(split, "checkpoint.pt"))["epoch"] == 2
    assert train(*args, "--epochs", "3", "--out", split, "--resume") == 0
    a = training.load_checkpoint(os.path.join(full, "checkpoint.pt"))
    b = training.load_checkpoint(os.path.join(split, "checkpoint.pt"))
    assert b["epoch"] == 3 and len(b["history"]) == 3
    # same data order and noise after the restart: the same weights
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], rtol=1e-5, atol=1e-6), k
    assert [r["train_loss"] for r in a["history"]] == pytest.approx([r["train_loss"] for r in b["history"]], rel=1e-5)


def test_refuses_to_overwrite_without_resume(tmp_path, capsys):
    out = str(tmp_path / "o")
    assert train("ae", "--data", "digits", "--epochs", "1", "--batches-per-epoch", "2", "--out", out) == 0
    assert train("ae", "--data", "digits", "--epochs", "2", "--out", out) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert train("vae", "--data", "digits", "--epochs", "2", "--out", out, "--resume") == 2
    assert "holds a 'ae' model" in capsys.readouterr().err


def test_sample_command(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert train("vae", "--data", "digits", "--epochs", "1", "--batches-per-epoch", "3", "--out", out) == 0
    ckpt = os.path.join(out, "checkpoint.pt")
    assert main(["sample", "vae", "--checkpoint", ckpt, "--out", str(tmp_path / "s"), "-n", "10", "--seed", "1"]) == 0
    x = torch.load(tmp_path / "s" / "samples.pt")
    assert x.shape == (10, 1, 8, 8) and 0 <= float(x.min()) and float(x.max()) <= 1
    assert os.path.getsize(tmp_path / "s" / "samples.png") > 0
    # seeded: the same images again
    assert main(["sample", "vae", "--checkpoint", ckpt, "--out", str(tmp_path / "t"), "-n", "10", "--seed", "1"]) == 0
    assert torch.equal(x, torch.load(tmp_path / "t" / "samples.pt"))
    capsys.readouterr()
    assert main(["sample", "ae", "--checkpoint", ckpt, "--out", str(tmp_path / "u")]) == 2
    assert "holds a 'vae' model" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["sample", "vae", "--checkpoint", str(bad), "--out", str(tmp_path / "u")]) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err


def _write_images(folder, n, size=(16, 16), mode="RGB", seed=0):
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        c = 3 if mode == "RGB" else 1
        arr = (torch.rand(size[1], size[0], c, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr[..., 0] if c == 1 else arr, mode).save(os.path.join(folder, f"img{i:02d}.png"))


def test_train_conv_vae_on_an_image_folder(tmp_path):
    folder = tmp_path / "imgs"
    _write_images(folder, 12, size=(20, 24))
    out = str(tmp_path / "run")
    # 20x24 images: conv needs a square 8*2^k side, so --size 16 center-crops and resizes
    assert train("vae", "--data", str(folder), "--arch", "conv", "--size", "16", "--epochs", "2",
                 "--batch-size", "4", "--out", out) == 0
    ckpt = training.load_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert ckpt["config"]["image_shape"] == (3, 16, 16) and ckpt["config"]["levels"] == 256
    for name in PNGS:
        assert os.path.exists(os.path.join(out, name))


@pytest.mark.parametrize("setup,message", [
    ("empty", "no images found"),
    ("mixed", "different sizes"),
    ("unreadable", "cannot read image"),
    ("missing", "no such file or folder"),
])
def test_bad_image_folders_give_clear_errors(tmp_path, capsys, setup, message):
    folder = tmp_path / "data"
    folder.mkdir()
    if setup == "mixed":
        _write_images(folder, 2, size=(16, 16))
        Image.new("RGB", (32, 16)).save(folder / "wide.png")
    elif setup == "unreadable":
        _write_images(folder, 2)
        (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but then garbage")
    elif setup == "missing":
        folder = tmp_path / "nope"
    assert train("vae", "--data", str(folder), "--epochs", "1", "--out", str(tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert message in err, err
    if setup == "unreadable":
        assert "broken.png" in err
    if setup == "mixed":
        assert "--size" in err


def test_bad_arguments(tmp_path, capsys):
    assert train("vae", "--data", "digits", "--epochs", "0", "--out", str(tmp_path)) == 2
    assert "--epochs must be >= 1" in capsys.readouterr().err
    # 8x8 digits resized to 12x12 cannot go through the conv nets
    assert train("vae", "--data", "digits", "--size", "12", "--arch", "conv", "--epochs", "1",
                 "--out", str(tmp_path / "c")) == 2
    assert "use arch='mlp'" in capsys.readouterr().err


# ---- the helpers -----------------------------------------------------------------------


def test_digits_dataset():
    ds = datasets.load_digits()
    assert ds.train.shape[1:] == (1, 8, 8) and ds.train.shape[0] + ds.test.shape[0] == 1797
    assert ds.levels == 17
    assert torch.equal(ds.train * 16, (ds.train * 16).round()) and ds.train.max() == 1
    assert torch.equal(datasets.load_digits().test, ds.test)  # fixed split
    b = datasets.load_digits(binarize=True)
    assert b.levels == 2 and set(b.train.unique().tolist()) == {0.0, 1.0}


def test_image_folder_grayscale_and_subfolders(tmp_path):
    _write_images(tmp_path / "a", 3, size=(8, 8), mode="L")
    _write_images(tmp_path / "a" / "sub", 2, size=(8, 8), mode="L", seed=1)
    ds = datasets.load_image_folder(str(tmp_path / "a"), test_fraction=0.2)
    assert ds.image_shape == (1, 8, 8) and ds.train.shape[0] + ds.test.shape[0] == 5
    assert torch.equal(ds.train * 255, (ds.train * 255).round())


def test_save_grid(tmp_path):
    path = save_grid(torch.rand(10, 3, 8, 8), str(tmp_path / "g.png"), nrow=5, scale=2, pad=1)
    with Image.open(path) as im:
        assert im.size == (5 * 17 + 1, 2 * 17 + 1) and im.mode == "RGB"
    assert to_grid(torch.zeros(1, 1, 4, 4), scale=1, pad=0).shape == (4, 4)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        to_grid(torch.zeros(2, 2, 4, 4))
    with pytest.raises(ValueError, match="empty"):
        to_grid(torch.zeros(0, 1, 4, 4))


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "ckpt.pt"
    training.save_checkpoint({"format": training.CHECKPOINT_FORMAT, "v": 1}, str(path))

    def boom(f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        training.atomic_write(str(path), boom)
    assert training.load_checkpoint(str(path))["v"] == 1
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_photo_crops_hold_out_a_strip_no_training_crop_touches():
    """The test crops of --data photo-crops come from pixels no training crop covers."""
    g = torch.Generator().manual_seed(3)
    train, test = datasets.photo_crop_boxes(500, 64, 427, 640, 128, 0.1, g)
    assert len(test) == 50 and len(train) == 450
    assert max(x + 64 for _, _, x in train) <= 640 - 128 <= min(x for _, _, x in test)
    assert max(x + 64 for _, _, x in test) <= 640 and max(y + 64 for _, y, _ in train + test) <= 427
    assert {i for i, _, _ in test} == {0, 1} and {i for i, _, _ in train} == {0, 1}
    ds = datasets.load_photo_crops(size=32, count=60)
    assert ds.train.shape == (54, 3, 32, 32) and ds.test.shape == (6, 3, 32, 32)
    assert "unseen in training" in ds.source
    # a training crop equal to a test crop would mean the same pixels
    assert not (ds.train[:, None] == ds.test[None]).flatten(2).all(2).any()
    with pytest.raises(ValueError, match="--size 300"):
        datasets.load_photo_crops(size=300)
    with pytest.raises(ValueError, match="test_fraction"):
        datasets.load_photo_crops(test_fraction=0)
