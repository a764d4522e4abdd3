"""Classifier-based rejection sampling (fastgen.rejection) and class-conditional priors
from the command line (`--class-conditional`, `--label`, `--min-confidence`)."""
import pytest
import torch

from fastgen.cli import main
from fastgen.rejection import digit_confidence, draw_confident


def _scored_draws(seed):
    """draw(m, labels) -> (m, 1) 'images' whose value is their score: uniform in [0, 1)."""
    g = torch.Generator().manual_seed(seed)
    calls = []

    def draw(m, labels):
        calls.append((m, None if labels is None else labels.clone()))
        return torch.rand(m, 1, generator=g)
    return draw, calls


def score(images, labels):
    return images[:, 0]


def test_keeps_passing_draws_and_the_best_of_failing_ones():
    draw, calls = _scored_draws(int(torch.randint(0, 2 ** 31, (1,))))
    labels = torch.arange(50) % 10
    images, st = draw_confident(draw, 50, 0.9, labels=labels, max_rounds=4, score=score)
    assert images.shape == (50, 1) and st["rounds"] <= 4 and len(calls) == st["rounds"]
    assert st["draws"] == sum(m for m, _ in calls)
    # redraws are only of the failing samples, with their own labels
    assert calls[0][0] == 50 and all(m < 50 for m, _ in calls[1:])
    for m, lab in calls[1:]:
        assert lab is not None and lab.shape == (m,)
    assert st["accepted"] == int((images[:, 0] >= 0.9).sum())
    assert torch.equal(st["confidence"], images[:, 0])
    # more rounds accept more (1 - 0.9^4 = 34 % per sample at least on average)
    assert st["accepted"] > 5


def test_one_round_is_plain_sampling():
    draw, calls = _scored_draws(3)
    images, st = draw_confident(draw, 20, 0.99, max_rounds=1, score=score)
    assert len(calls) == 1 and st["draws"] == 20


def test_with_the_digits_classifier_the_kept_digits_carry_the_wanted_label():
    from fastgen.data import digits_labels, load_digits
    x, (_, y) = load_digits().test, digits_labels()
    g = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 31, (1,))))

    def draw(m, labels):     # real test digits at random, whatever the label asks
        return x[torch.randint(0, x.shape[0], (m,), generator=g)]
    want = torch.arange(40) % 10
    images, st = draw_confident(draw, 40, 0.8, labels=want, max_rounds=60)
    conf = digit_confidence(images, want)
    assert torch.allclose(conf, st["confidence"])
    passed = conf >= 0.8
    assert int(passed.sum()) == st["accepted"] >= 36
    # without labels: the classifier's top class counts
    images, st = draw_confident(draw, 10, 0.8, max_rounds=5)
    assert torch.allclose(digit_confidence(images), st["confidence"])


def test_bad_arguments():
    draw, _ = _scored_draws(0)
    with pytest.raises(ValueError, match="min_confidence"):
        draw_confident(draw, 4, 1.5, score=score)
    with pytest.raises(ValueError, match="max-rounds"):
        draw_confident(draw, 4, 0.5, max_rounds=0, score=score)
    with pytest.raises(ValueError, match=r"labels must be \(4,\)"):
        draw_confident(draw, 4, 0.5, labels=torch.zeros(3, dtype=torch.long), score=score)


QUICK = ["--epochs", "1", "--batches-per-epoch", "2", "--threads", "1", "--quiet"]


@pytest.fixture(scope="module")
def digits_vq(tmp_path_factory):
    """A tiny VQ-VAE on digits, shared by the command-line tests."""
    vq = tmp_path_factory.mktemp("vq")
    assert main(["train", "vqvae", "--data", "digits", "--hidden", "16", "--res-blocks", "1", "--num-codes", "16",
                 "--out", str(vq), *QUICK]) == 0
    return vq


def _prior(vq, out, *flags):
    """A tiny pixelcnn over the VQ-VAE's codes; the `fastgen sample vqvae` arguments that use it."""
    assert main(["train", "pixelcnn", "--vqvae", str(vq / "checkpoint.pt"), "--prior-dim", "8", "--prior-layers", "2",
                 "--out", str(out), *flags, *QUICK]) == 0
    return ["sample", "vqvae", "--checkpoint", str(vq / "checkpoint.pt"), "--prior", str(out / "checkpoint.pt")]


def test_class_conditional_prior_from_the_command_line(tmp_path, digits_vq, capsys):
    vq, pri = digits_vq, tmp_path / "prior"
    base = _prior(vq, pri, "--class-conditional", "--attention", "every", "--dropout", "0.1")
    ck = torch.load(pri / "checkpoint.pt", weights_only=False)
    assert ck["config"]["num_classes"] == 10 and ck["config"]["attention"] == "every"
    assert main([*base, "--label", "3,7", "-n", "6", "--out", str(tmp_path / "s")]) == 0
    out = torch.load(tmp_path / "s" / "samples.pt", weights_only=True)
    assert out["labels"].tolist() == [3, 7, 3, 7, 3, 7] and out["images"].shape == (6, 1, 8, 8)
    capsys.readouterr()
    assert main([*base, "--label", "3", "-n", "4", "--min-confidence", "0.5", "--max-rounds", "2",
                 "--out", str(tmp_path / "r")]) == 0
    assert "rejection:" in capsys.readouterr().out
    out = torch.load(tmp_path / "r" / "samples.pt", weights_only=True)
    assert torch.allclose(out["confidence"], digit_confidence(out["images"], torch.full((4,), 3)), atol=1e-5)
    # eval draws every class in turn from a class-conditional prior
    assert main(["eval", "--fake", str(vq / "checkpoint.pt"), "--prior", str(pri / "checkpoint.pt"), "-n", "40"]) == 0
    # resuming keeps the conditioning (read from the checkpoint)
    assert main(["train", "pixelcnn", "--resume", "--out", str(pri), "--epochs", "2", "--batches-per-epoch", "2",
                 "--threads", "1", "--quiet"]) == 0
    capsys.readouterr()
    for bad, msg in ((["--label", "12"], "--label classes must be in"), (["--label", "x"], "--label must be"),
                     (["--min-confidence", "1.5"], "--min-confidence must be in"),
                     (["--min-confidence", "0.5", "--max-rounds", "0"], "--max-rounds")):
        assert main([*base, *bad, "-n", "2", "--out", str(tmp_path / "bad")]) != 0
        assert msg in capsys.readouterr().err


def test_label_needs_a_conditional_prior_or_rejection(tmp_path, digits_vq, capsys):
    base = _prior(digits_vq, tmp_path / "prior")
    capsys.readouterr()
    assert main([*base, "--label", "3", "-n", "2", "--out", str(tmp_path / "s")]) != 0
    assert "class-conditional" in capsys.readouterr().err
    # with rejection an unconditional prior draws until the classifier says 3
    assert main([*base, "--label", "3", "--min-confidence", "0.5", "--max-rounds", "3", "-n", "2",
                 "--out", str(tmp_path / "s")]) == 0
    out = torch.load(tmp_path / "s" / "samples.pt", weights_only=True)
    assert out["labels"].tolist() == [3, 3]
    assert torch.allclose(out["confidence"], digit_confidence(out["images"], out["labels"]), atol=1e-5)
    # photo data has no labels
    assert main(["train", "vqvae", "--data", "photo-crops", "--size", "8", "--hidden", "8", "--res-blocks", "1",
                 "--num-codes", "8", "--out", str(tmp_path / "pv"), *QUICK]) == 0
    capsys.readouterr()
    assert main(["train", "pixelcnn", "--vqvae", str(tmp_path / "pv" / "checkpoint.pt"), "--class-conditional",
                 "--prior-dim", "8", "--prior-layers", "1", "--out", str(tmp_path / "pp"), *QUICK]) != 0
    assert "labelled images" in capsys.readouterr().err
