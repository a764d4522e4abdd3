"""`fastgen sample` and `fastgen gpnn` against a hostile user: run folders that move,
priors of another VQ model, sizes that cannot fit, flags that are nan, inf or negative,
a --device this torch cannot use. Each was a traceback, a MemoryError, garbage samples
or a silently ignored flag before."""
import shutil

import pytest
import torch

from fastgen import training
from fastgen.cli import main

QUICK = ["--epochs", "1", "--batches-per-epoch", "2", "--threads", "1", "--quiet"]
TINY_VQ = ["--data", "digits", "--hidden", "16", "--res-blocks", "1", "--num-codes", "16", "--code-dim", "8"]
TINY_TR = ["--dim", "16", "--layers", "1", "--heads", "2", "--text-tokens", "12"]


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line(err):
    return len(err.strip().splitlines()) == 1 and "Traceback" not in err


def train(*argv):
    assert main([str(a) for a in argv] + QUICK) == 0, argv


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two VQ-VAEs of the same shapes (seeds 0 and 1: other codebooks), a PixelCNN and a
    transformer trained on the first, a VAE; tiny, one short epoch each."""
    root = tmp_path_factory.mktemp("runs")
    r = {k: str(root / k / "checkpoint.pt") for k in ("vq_a", "vq_b", "pixelcnn", "transformer", "vae")}
    train("train", "vqvae", *TINY_VQ, "--seed", "0", "--out", root / "vq_a")
    train("train", "vqvae", *TINY_VQ, "--seed", "1", "--out", root / "vq_b")
    train("train", "pixelcnn", "--vqvae", r["vq_a"], "--prior-dim", "16", "--prior-layers", "2", "--out",
          root / "pixelcnn")
    train("train", "transformer", "--vqvae", r["vq_a"], *TINY_TR, "--out", root / "transformer")
    train("train", "vae", "--data", "digits", "--out", root / "vae")
    return r


# --- 1. a moved folder of runs ---------------------------------------------------------

def test_transformer_samples_after_its_runs_folder_moved(tmp_path, capsys):
    old = tmp_path / "old"
    train("train", "vqvae", *TINY_VQ, "--out", old / "vq")
    train("train", "transformer", "--vqvae", old / "vq" / "checkpoint.pt", *TINY_TR, "--out", old / "tr")
    shutil.move(str(old), str(tmp_path / "new"))
    rc, _, err = run(capsys, "sample", "transformer", "--checkpoint", tmp_path / "new" / "tr" / "checkpoint.pt",
                     "--prompt", "a seven", "-n", "2", "--out", tmp_path / "s")
    assert rc == 0, err
    assert torch.load(tmp_path / "s" / "samples.pt", weights_only=True)["images"].shape == (2, 1, 8, 8)
    # resuming the moved run finds its VQ model the same way
    rc, _, err = run(capsys, "train", "transformer", "--out", tmp_path / "new" / "tr", "--resume",
                     "--epochs", "2", "--batches-per-epoch", "2", "--threads", "1", "--quiet")
    assert rc == 0, err
    # gone (the resumed run recorded the new place): one line naming where it was looked for
    shutil.rmtree(tmp_path / "new" / "vq")
    rc, _, err = run(capsys, "sample", "transformer", "--checkpoint", tmp_path / "new" / "tr" / "checkpoint.pt",
                     "--prompt", "a seven", "-n", "2", "--out", tmp_path / "s")
    assert rc == 2 and one_line(err) and "no longer exists" in err \
        and str(tmp_path / "new" / "vq" / "checkpoint.pt") in err


# --- 2. a prior of another VQ model ------------------------------------------------------

def test_pixelcnn_of_another_vqvae_is_refused(runs, tmp_path, capsys):
    base = ["sample", "vqvae", "--prior", runs["pixelcnn"], "-n", "2", "--out", tmp_path / "s"]
    rc, _, err = run(capsys, *base, "--checkpoint", runs["vq_b"])
    assert rc == 2 and one_line(err), err
    assert "another VQ model" in err and runs["pixelcnn"] in err and runs["vq_b"] in err
    assert run(capsys, *base, "--checkpoint", runs["vq_a"])[0] == 0
    # a prior written before fingerprints: accepted, with a warning
    ck = torch.load(runs["pixelcnn"], weights_only=True)
    del ck[training.FINGERPRINT]
    old = str(tmp_path / "old.pt")
    torch.save(ck, old)
    rc, _, err = run(capsys, "sample", "vqvae", "--prior", old, "--checkpoint", runs["vq_b"], "-n", "2",
                     "--out", tmp_path / "s")
    assert rc == 0 and "warning" in err and "no codebook fingerprint" in err


def test_transformer_refuses_a_vq_model_with_other_codes(runs, tmp_path, capsys):
    ck = torch.load(runs["transformer"], weights_only=True)
    ck["vq_checkpoint"], ck["vq_checkpoint_relative"] = runs["vq_b"], None      # same shapes, other codes
    bad = str(tmp_path / "bad.pt")
    torch.save(ck, bad)
    rc, _, err = run(capsys, "sample", "transformer", "--checkpoint", bad, "--prompt", "a seven", "-n", "2",
                     "--out", tmp_path / "s")
    assert rc == 2 and one_line(err) and "another VQ model" in err and bad in err and runs["vq_b"] in err


def test_vqvae2_priors_of_another_vqvae2_are_refused(tmp_path, capsys):
    vq2 = ["--data", "digits", "--hidden", "16", "--res-blocks", "1", "--num-codes", "8", "--code-dim", "4"]
    for seed in (0, 1):
        train("train", "vqvae2", *vq2, "--seed", seed, "--out", tmp_path / f"vq{seed}")
    for level in ("top", "bottom"):
        train("train", "prior", "--vqvae2", tmp_path / "vq0" / "checkpoint.pt", "--level", level,
              "--prior-dim", "8", "--prior-layers", "1", "--out", tmp_path / level)
    base = ["sample", "vqvae2", "--top-prior", tmp_path / "top" / "checkpoint.pt", "--bottom-prior",
            tmp_path / "bottom" / "checkpoint.pt", "-n", "2", "--reconstruct", "0", "--out", tmp_path / "s"]
    rc, _, err = run(capsys, *base, "--checkpoint", tmp_path / "vq1" / "checkpoint.pt")
    assert rc == 2 and one_line(err) and "--top-prior" in err and "another VQ model" in err
    assert run(capsys, *base, "--checkpoint", tmp_path / "vq0" / "checkpoint.pt")[0] == 0


# --- 3. sizes that cannot fit ------------------------------------------------------------

def test_sample_counts_that_cannot_fit_are_refused_first(runs, tmp_path, capsys):
    rc, _, err = run(capsys, "sample", "transformer", "--checkpoint", runs["transformer"], "--prompt", "a seven",
                     "-n", "1000000000", "--out", tmp_path / "s")
    assert rc == 2 and one_line(err) and "-n 1000000000" in err and "memory" in err
    rc, _, err = run(capsys, "sample", "vae", "--checkpoint", runs["vae"], "-n", 10 ** 12, "--out", tmp_path / "s")
    assert rc == 2 and one_line(err) and "-n 1000000000000" in err
    assert not (tmp_path / "s").exists()


def test_sample_count_is_checked_against_the_memory_available(runs, tmp_path, capsys, monkeypatch):
    from fastgen.commands import train as train_cmd
    monkeypatch.setattr(train_cmd, "available_memory", lambda device="cpu": 64 * 2 ** 20)
    rc, _, err = run(capsys, "sample", "vae", "--checkpoint", runs["vae"], "-n", 100000, "--out", tmp_path / "s")
    assert rc == 2 and one_line(err) and "-n 100000 needs about" in err and "0.0625 GiB is available" in err
    assert run(capsys, "sample", "vae", "--checkpoint", runs["vae"], "-n", 4, "--out", tmp_path / "s")[0] == 0


def test_a_huge_nrow_is_one_row_not_a_huge_grid(runs, tmp_path, capsys):
    rc, _, err = run(capsys, "sample", "vae", "--checkpoint", runs["vae"], "-n", 4, "--nrow", 10 ** 9,
                     "--out", tmp_path / "s")
    assert rc == 0, err
    from PIL import Image
    with Image.open(tmp_path / "s" / "samples.png") as im:
        assert im.size[0] > im.size[1] and im.size[0] < 1000


def test_gpnn_sample_count_is_capped_before_the_job_list(tmp_path, capsys):
    rc, _, err = run(capsys, "gpnn", "sample", "-n", 1000000000, "--out", tmp_path / "g")
    assert rc == 2 and one_line(err) and "-n 1000000000" in err and "1,000,000" in err


def test_gpnn_sizes_are_checked_against_the_memory_available(tmp_path, capsys, monkeypatch):
    from PIL import Image
    from fastgen.commands import train as train_cmd
    img = tmp_path / "a.png"
    Image.new("RGB", (40, 30), (10, 200, 30)).save(img)
    monkeypatch.setattr(train_cmd, "available_memory", lambda device="cpu": 2 ** 30)
    rc, _, err = run(capsys, "gpnn", "retarget", img, "--size", "4000x4000", "--out", tmp_path / "r")
    assert rc == 2 and one_line(err) and "--size 4000x4000" in err and "memory" in err
    rc, _, err = run(capsys, "gpnn", "sample", img, "--size", "2000x2000", "--batch", "8", "-n", "8",
                     "--out", tmp_path / "g")
    assert rc == 2 and one_line(err) and "--batch 8" in err
    assert not (tmp_path / "g").exists()


# --- 4. sampling flags --------------------------------------------------------------------

@pytest.mark.parametrize("flag, value, message", [
    ("--temperature", "nan", "--temperature must be a finite number"),
    ("--temperature", "inf", "--temperature must be a finite number"),
    ("--temperature", "-1", "--temperature must be > 0"),
    ("--guidance", "inf", "--guidance must be a finite number"),
    ("--guidance", "nan", "--guidance must be a finite number"),
    ("--guidance", "-0.5", "--guidance must be in [0, 1000]"),
    ("--guidance", "1e30", "--guidance must be in [0, 1000]"),
    ("--top-p", "nan", "--top-p must be a finite number"),
    ("--top-p", "1.5", "--top-p must be in (0, 1]"),
    ("--top-k", "0", "--top-k must be >= 1"),
    ("--nrow", "-3", "--nrow must be >= 1"),
    ("--nrow", "0", "--nrow must be >= 1"),
    ("--rerank", "0", "--rerank must be >= 1"),
    ("--seed", str(2 ** 70), "--seed must be in"),
])
def test_transformer_sampling_flags_are_checked(runs, tmp_path, capsys, flag, value, message):
    rc, _, err = run(capsys, "sample", "transformer", "--checkpoint", runs["transformer"], "--prompt", "a seven",
                     "-n", "2", flag, value, "--out", tmp_path / "s")
    assert rc == 2 and one_line(err) and message in err, err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("model, extra", [("vqvae", ["--prior", "P"]), ("vae", []),
                                           ("vqvae2", ["--top-prior", "T", "--bottom-prior", "B"])])
@pytest.mark.parametrize("flag, value, message", [
    ("--nrow", "0", "--nrow must be >= 1"), ("-n", "0", "-n must be >= 1"),
    ("--temperature", "nan", "--temperature must be a finite number")])
def test_flags_are_checked_before_any_checkpoint_is_read(tmp_path, capsys, model, extra, flag, value, message):
    if flag == "--temperature" and model == "vae":
        pytest.skip("vae has no --temperature")
    rc, _, err = run(capsys, "sample", model, "--checkpoint", tmp_path / "missing.pt", *extra, flag, value,
                     "--out", tmp_path / "s")
    assert rc == 2 and one_line(err) and message in err, err


def test_tiny_temperature_is_a_greedy_draw(runs, tmp_path, capsys):
    for i, seed in enumerate((0, 1)):
        rc, _, err = run(capsys, "sample", "transformer", "--checkpoint", runs["transformer"], "--prompt", "a seven",
                         "-n", "2", "--temperature", "1e-40", "--seed", seed, "--out", tmp_path / f"s{i}")
        assert rc == 0, err
    a, b = (torch.load(tmp_path / f"s{i}" / "samples.pt", weights_only=True)["images"] for i in (0, 1))
    assert torch.isfinite(a).all() and torch.equal(a, b)         # argmax at every step: no randomness left
    rc, _, err = run(capsys, "sample", "vqvae", "--checkpoint", runs["vq_a"], "--prior", runs["pixelcnn"],
                     "-n", "2", "--temperature", "1e-40", "--out", tmp_path / "v")
    assert rc == 0, err


# --- 5. gpnn --device ----------------------------------------------------------------------

@pytest.mark.parametrize("task", ["sample", "retarget"])
def test_gpnn_unusable_device_is_one_line(tmp_path, capsys, task):
    bad = "tpu" if torch.cuda.is_available() else "cuda"
    extra = ["-n", "1"] if task == "sample" else [str(tmp_path / "missing.png"), "--size", "16x16"]
    rc, _, err = run(capsys, "gpnn", task, *extra, "--device", bad, "--out", tmp_path / "g")
    assert rc == 2 and one_line(err) and "--device" in err, err
    assert not (tmp_path / "g").exists()


def test_gpnn_device_index_past_the_last_gpu(tmp_path, capsys):
    rc, _, err = run(capsys, "gpnn", "sample", "-n", "1", "--device", f"cuda:{max(1, torch.cuda.device_count())}",
                     "--out", tmp_path / "g")
    assert rc == 2 and one_line(err) and "--device cuda:" in err
