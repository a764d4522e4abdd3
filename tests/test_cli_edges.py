"""Issue 13's command-line and model-input edges: each was a traceback, a late error, a
misleading name or a silent change before."""
import os
import signal

import pytest
import torch

import fastgen.models as M
from fastgen import training
from fastgen.cli import main

QUICK = ["--epochs", "1", "--batches-per-epoch", "2", "--threads", "1", "--quiet"]


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("where", ["file", "below a file"])
def test_unusable_out_is_refused_before_any_epoch(tmp_path, capsys, where):
    f = tmp_path / "afile"
    f.write_text("x")
    out = str(f) if where == "file" else str(f / "sub")
    rc, stdout, err = run(capsys, "train", "vae", "--data", "digits", "--out", out, *QUICK)
    assert rc == 2 and "--out" in err and "Traceback" not in err
    assert "epoch 1" not in stdout                   # found before the first step


@pytest.mark.parametrize("flag, value", [("--lr", "inf"), ("--lr", "nan"), ("--beta", "nan")])
def test_non_finite_float_flags_are_refused_first(tmp_path, capsys, flag, value):
    rc, stdout, err = run(capsys, "train", "vae", "--data", "digits", "--out", str(tmp_path / "o"), flag, value, *QUICK)
    assert rc == 2 and f"{flag} must be a finite number" in err and "mu contains" not in err
    assert "epoch 1" not in stdout


def test_unusable_device_is_one_line(tmp_path, capsys):
    bad = "tpu" if torch.cuda.is_available() else "cuda"
    rc, _, err = run(capsys, "train", "vae", "--data", "digits", "--out", str(tmp_path / "o"), "--device", bad, *QUICK)
    assert rc == 2 and "--device" in err and "Traceback" not in err


def test_resume_refuses_conflicting_flags_and_accepts_the_same(tmp_path, capsys):
    out = str(tmp_path / "r")
    assert run(capsys, "train", "vae", "--data", "digits", "--out", out, "--batch-size", "32", *QUICK)[0] == 0
    again = ["train", "vae", "--out", out, "--resume", "--epochs", "2", "--batches-per-epoch", "2", "--quiet"]
    rc, _, err = run(capsys, *again, "--data", str(tmp_path))          # another --data
    assert rc == 2 and "--data" in err and "differs from the run being resumed" in err
    rc, _, err = run(capsys, *again, "--batch-size", "64")             # a mid-run change
    assert rc == 2 and "--batch-size 64 differs" in err
    rc, _, err = run(capsys, *again, "--data", "digits", "--batch-size", "32")   # the same: fine
    assert rc == 0, err
    assert torch.load(os.path.join(out, "checkpoint.pt"))["epoch"] == 2


def test_stale_temporaries_are_removed_at_the_next_start(tmp_path, capsys):
    out = tmp_path / "t"
    out.mkdir()
    (out / ".tmp-abc123").write_bytes(b"half a checkpoint")
    assert run(capsys, "train", "vae", "--data", "digits", "--out", str(out), *QUICK)[0] == 0
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]


def test_ctrl_c_is_one_line_and_the_checkpoint_stays_whole(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "c")
    assert run(capsys, "train", "vae", "--data", "digits", "--out", out, *QUICK)[0] == 0
    monkeypatch.setattr(training, "train_epoch", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    rc, _, err = run(capsys, "train", "vae", "--out", out, "--resume", "--epochs", "3", "--quiet")
    assert rc == 130 and "interrupted" in err and "--resume" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert training.load_checkpoint(os.path.join(out, "checkpoint.pt"))["epoch"] == 1


def test_ctrl_c_during_a_checkpoint_write_waits_for_the_file(tmp_path):
    path = str(tmp_path / "ck.pt")

    def write(f):
        os.kill(os.getpid(), signal.SIGINT)              # Ctrl-C in the middle of the write
        torch.save({"w": torch.arange(1000)}, f)
    with pytest.raises(KeyboardInterrupt):
        training.atomic_write(path, write)
    assert torch.equal(torch.load(path)["w"], torch.arange(1000))
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]


def test_decompression_bomb_is_one_line(tmp_path, capsys, monkeypatch):
    from PIL import Image
    img = tmp_path / "big.png"
    Image.new("RGB", (400, 300), (10, 200, 30)).save(img)
    # the loader sets Pillow's global limit from the variable: restore it afterwards
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    monkeypatch.setenv("FASTGEN_MAX_IMAGE_PIXELS", "1000")
    rc, _, err = run(capsys, "gpnn", "sample", str(img), "-n", "1", "--out", str(tmp_path / "g"))
    assert rc == 2 and "decompression-bomb" in err and "FASTGEN_MAX_IMAGE_PIXELS" in err


def test_help_texts(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "imle" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["train", "vae", "--help"])
    text = capsys.readouterr().out
    assert "(default: None)" not in text and "0.2 for digits" in text


@pytest.mark.parametrize("kind", ["ae", "vae", "vqvae"])
@pytest.mark.parametrize("bad, match", [
    (torch.full((4, 1, 8, 8), float("nan")), "^x contains NaN"),
    (torch.rand(0, 1, 8, 8), "^x is empty"),
    (torch.rand(4, 1, 6, 6), r"^x must be \(B, 1, 8, 8\)"),
    (torch.ones(4, 1, 8, 8, dtype=torch.long), "^x must be a floating tensor"),
])
def test_models_name_their_input(kind, bad, match):
    model = M.build_model(kind, dict(image_shape=(1, 8, 8)))
    with pytest.raises((ValueError, TypeError), match=match):
        model(bad)


def test_iwae_k_zero():
    v = M.build_model("vae", dict(image_shape=(1, 8, 8)))
    with pytest.raises(ValueError, match="k .* must be an int >= 1"):
        v.iwae(torch.rand(3, 1, 8, 8), k=0)


@pytest.mark.parametrize("size", ["0x100", "100x99999", "-5x10"])
def test_gpnn_output_size_is_bounded(tmp_path, capsys, size):
    rc, _, err = run(capsys, "gpnn", "retarget", f"--size={size}", "--out", str(tmp_path / "r"),
                     str(tmp_path / "missing.png"))
    assert rc == 2 and "--size" in err


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, device="meta", dtype=dtype)


@pytest.mark.parametrize("call, match", [
    (lambda: torch.ops.fastgen.knn(_meta(1, 5, 4), _meta(1, 3, 4), 10, False, "fp32"), "k must be in"),
    (lambda: torch.ops.fastgen.knn(_meta(1, 5, 4, dtype=torch.long), _meta(1, 3, 4, dtype=torch.long), 1, False,
                                   "fp32"), "float32, float16 or bfloat16"),
    (lambda: torch.ops.fastgen.nearest_code(_meta(5, 4), _meta(0, 4), "fp32"), "codebook is empty"),
    (lambda: torch.ops.fastgen.patch_nn(_meta(1, 5, 4), _meta(1, 6, 3), 0.1, "fp32"), "D="),
])
def test_meta_shape_functions_refuse_what_the_kernels_refuse(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_alpha_string_and_sparse_inputs():
    from fastgen.ops import knn, patch_nn
    with pytest.raises(TypeError, match="alpha must be a number"):
        patch_nn(torch.rand(5, 4), torch.rand(6, 4), "0.1")
    with pytest.raises(TypeError, match="queries must be a dense tensor"):
        knn(torch.rand(5, 4).to_sparse(), torch.rand(6, 4), 1)


def test_resume_without_flags_keeps_the_runs_settings(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "k")
    assert run(capsys, "train", "vae", "--data", "digits", "--out", out, "--batch-size", "16", *QUICK)[0] == 0
    seen = []
    real = training.train_epoch
    monkeypatch.setattr(training, "train_epoch", lambda m, o, d, bs, *a, **k: seen.append((bs, k["max_batches"]))
                        or real(m, o, d, bs, *a, **k))
    # not given now: the run's 16 and 2, not the defaults 64 and None
    assert run(capsys, "train", "vae", "--out", out, "--resume", "--epochs", "2", "--quiet")[0] == 0
    assert seen == [(16, 2)]
    # an abbreviated flag is seen as given
    rc, _, err = run(capsys, "train", "vae", "--out", out, "--resume", "--epochs", "3", "--quiet", "--batch-s", "64")
    assert rc == 2 and "--batch-size 64 differs" in err
