"""Digit features, class coverage, evaluate_samples and `fastgen eval`."""
import json
import os

import numpy as np
import pytest
import torch

import fastgen.metrics.digit_features as dfeat
from fastgen.cli import main
from fastgen.data import load_digits
from fastgen.metrics.evaluate import evaluate_samples


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def test_classifier_is_accurate_cached_and_deterministic(tmp_path, monkeypatch, digits):
    model = dfeat.classifier()
    assert model.accuracy > 0.93                      # held-out digits
    assert os.path.isfile(os.path.join(dfeat.cache_dir(), f"digits_classifier_v{dfeat.VERSION}.pt"))
    # short trainings twice: the same weights (seeded, one thread)
    a, _ = dfeat.train_classifier(epochs=1)
    b, _ = dfeat.train_classifier(epochs=1)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    # a damaged cache file is replaced by a retrained model, not an error
    monkeypatch.setenv("FASTGEN_CACHE", str(tmp_path))
    monkeypatch.setattr(dfeat, "_model", None)
    monkeypatch.setattr(dfeat, "train_classifier", lambda: (dfeat.DigitsClassifier(), 0.5))
    (tmp_path / f"digits_classifier_v{dfeat.VERSION}.pt").write_bytes(b"not a torch file")
    assert dfeat.classifier().accuracy == 0.5
    monkeypatch.setattr(dfeat, "_model", None)
    assert dfeat.classifier().accuracy == 0.5          # read back from the rewritten cache


def test_class_coverage_sees_a_missing_mode(digits):
    real = digits.test
    whole = dfeat.class_coverage(digits.train[:400], real)
    assert whole["class_coverage"] == 1.0 and whole["class_tv"] < 0.15
    zeros = real[dfeat.digit_classes(real) == 0]
    only0 = dfeat.class_coverage(zeros, real)
    assert only0["class_coverage"] == pytest.approx(0.1) and only0["class_tv"] > 0.8
    assert only0["class_hist_fake"][0] == 1.0


def test_metrics_rank_data_above_noise(digits):
    real, train = digits.test, digits.train[:359]
    noise = torch.rand_like(real)
    blurred = torch.nn.functional.avg_pool2d(train, 3, 1, 1)
    good = evaluate_samples(real, train)
    worse = evaluate_samples(real, blurred)
    bad = evaluate_samples(real, noise)
    assert good["fd"] < worse["fd"] and good["fd"] < bad["fd"]
    assert good["precision"] > 0.9 and bad["precision"] < good["precision"] - 0.2
    assert good["coverage"] > worse["coverage"] and good["coverage"] > bad["coverage"]
    # features given directly are used as they are (2-D input)
    f = evaluate_samples(torch.randn(50, 8), torch.randn(60, 8) + 5, k=3)
    assert f["precision"] == 0.0 and "class_coverage" not in f


def test_feature_module_and_torchscript(tmp_path, digits):
    real, fake = digits.test[:100], digits.train[:100]
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16))
    by_module = evaluate_samples(real, fake, features=module, k=3)
    path = str(tmp_path / "f.ts")
    torch.jit.save(torch.jit.script(module), path)
    by_file = evaluate_samples(real, fake, features=path, k=3)
    assert by_module["fd"] == pytest.approx(by_file["fd"], rel=1e-9)
    raw = evaluate_samples(real, fake, features="raw", k=3)
    assert raw["n_real"] == 100 and raw["fd"] > 0


@pytest.mark.parametrize("call,exc,msg", [
    (lambda d: evaluate_samples(d.test, torch.randn(20, 64)), ValueError, "real is images but fake is features"),
    (lambda d: evaluate_samples(d.test, d.test.repeat(1, 3, 1, 1)), ValueError, "digit features need 1-channel"),
    (lambda d: evaluate_samples(d.test, d.test * 3), ValueError, r"fake images must be in \[0, 1\]"),
    (lambda d: evaluate_samples(d.test[:4], d.test), ValueError, "real has 4 points"),
    (lambda d: evaluate_samples(d.test, d.test, features="nope.ts"), FileNotFoundError, "nope.ts"),
    (lambda d: evaluate_samples(d.test, d.test, features=3), TypeError, "features must be"),
    (lambda d: evaluate_samples(d.test, d.test * float("nan")), ValueError, "NaN"),
])
def test_bad_inputs(call, exc, msg, digits):
    with pytest.raises(exc, match=msg):
        call(digits)


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    for kind in ("vae", "imle"):
        assert main(["train", kind, "--data", "digits", "--epochs", "1", "--batches-per-epoch", "2",
                     "--out", str(runs / kind), "--quiet"]) == 0
    assert main(["train", "imle", "--data", "digits", "--conditional", "top-half", "--epochs", "1",
                 "--batches-per-epoch", "2", "--out", str(runs / "conditional" / "imle"), "--quiet"]) == 0
    return runs


def test_table_covers_vqvae2_and_the_transformer(tmp_path, capsys):
    q = ["--epochs", "1", "--batches-per-epoch", "2", "--quiet", "--threads", "1"]
    runs = tmp_path / "runs"
    assert main(["train", "vqvae2", "--data", "digits", "--size", "32", "--hidden", "16", "--num-codes", "16",
                 "--code-dim", "4", "--out", str(runs / "vqvae2"), *q]) == 0
    for level in ("top", "bottom"):
        assert main(["train", "prior", "--vqvae2", str(runs / "vqvae2" / "checkpoint.pt"), "--level", level,
                     "--prior-dim", "8", "--prior-layers", "1", "--out", str(runs / f"prior-{level}"), *q]) == 0
    assert main(["train", "vqvae", "--data", "digits", "--hidden", "16", "--res-blocks", "1", "--num-codes", "16",
                 "--out", str(runs / "vqvae"), *q]) == 0
    assert main(["train", "transformer", "--vqvae", str(runs / "vqvae" / "checkpoint.pt"), "--dim", "16",
                 "--layers", "1", "--heads", "2", "--out", str(runs / "transformer"), *q]) == 0
    capsys.readouterr()
    assert main(["eval", "--table", str(runs), "-n", "40"]) == 0
    table = json.load(open(runs / "eval.json"))
    assert {"vqvae2 + priors", "transformer"} <= set(table)
    for name in ("vqvae2 + priors", "transformer"):
        assert table[name]["n_fake"] == 40 and 0 <= table[name]["confident"] <= 1 and table[name]["train_minutes"] > 0
    # the transformer's minutes include its VQ model's
    vq_s = sum(r["seconds"] for r in map(json.loads, open(runs / "vqvae" / "metrics.jsonl")))
    tr_s = sum(r["seconds"] for r in map(json.loads, open(runs / "transformer" / "metrics.jsonl")))
    assert table["transformer"]["train_minutes"] == pytest.approx((vq_s + tr_s) / 60, rel=1e-3)
    # one vqvae2 directly, with both priors
    out = str(tmp_path / "m.json")
    assert main(["eval", "--fake", str(runs / "vqvae2" / "checkpoint.pt"), "--prior",
                 str(runs / "prior-top" / "checkpoint.pt"), "--bottom-prior", str(runs / "prior-bottom" / "checkpoint.pt"),
                 "-n", "30", "--json", out]) == 0
    assert json.load(open(out))["n_fake"] == 30
    capsys.readouterr()
    assert main(["eval", "--fake", str(runs / "vqvae2" / "checkpoint.pt"), "-n", "30"]) != 0
    assert "--bottom-prior" in capsys.readouterr().err


def test_cli_files_checkpoints_and_table(tmp_path, tiny_runs, digits, capsys):
    real = str(tmp_path / "real.npy")
    np.save(real, dfeat.digit_features(digits.test).numpy())
    fake = str(tmp_path / "fake.pt")
    torch.save({"images": digits.train[:200]}, fake)          # what `fastgen sample` writes
    out = str(tmp_path / "m.json")
    assert main(["eval", "--real", "digits", "--fake", fake, "--json", out]) == 0
    m = json.load(open(out))
    assert m["n_fake"] == 200 and m["class_coverage"] == 1.0
    # features files on both sides
    np.save(str(tmp_path / "fake.npy"), dfeat.digit_features(digits.train[:200]).numpy())
    assert main(["eval", "--real", real, "--fake", str(tmp_path / "fake.npy"), "--json", out]) == 0
    assert json.load(open(out))["fd"] == pytest.approx(m["fd"], rel=1e-6)
    # a checkpoint: samples drawn from it
    assert main(["eval", "--fake", str(tiny_runs / "vae" / "checkpoint.pt"), "-n", "100", "--json", out]) == 0
    assert json.load(open(out))["n_fake"] == 100
    # every model under a folder: one table
    capsys.readouterr()
    assert main(["eval", "--table", str(tiny_runs), "-n", "60"]) == 0
    text = capsys.readouterr().out
    assert "| data (train split) |" in text and "| vae |" in text and "| imle |" in text
    assert set(json.load(open(tiny_runs / "eval.json"))) == {"data (train split)", "vae", "imle"}
    assert (tiny_runs / "eval.md").read_text().startswith("| model |")


def test_cli_errors(tmp_path, tiny_runs, capsys):
    bad = str(tmp_path / "bad.npy")
    np.save(bad, np.zeros((3, 4, 5)))
    cases = [
        (["eval"], "give --fake"),
        (["eval", "--fake", "x.pt", "--table", str(tmp_path)], "give --fake"),
        (["eval", "--fake", str(tmp_path / "missing.npy")], "no such file"),
        (["eval", "--fake", bad], r"must hold features \(N, D\) or images"),
        (["eval", "--table", str(tmp_path / "empty")], "no such folder"),
        (["eval", "--fake", "digits"], "only a --real set"),
        (["eval", "--fake", str(tiny_runs / "vae" / "checkpoint.pt"), "-n", "1"], "-n must be >= 2"),
        (["eval", "--fake", str(tiny_runs / "conditional" / "imle" / "checkpoint.pt")], "conditional IMLE"),
        (["eval", "--fake", str(tmp_path / "nothing.pt")], "no such file"),
    ]
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    cases.append((["eval", "--fake", str(tmp_path / "junk.pt")], "not a readable"))
    for argv, msg in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        import re
        assert re.search(msg, capsys.readouterr().err), (argv, msg)


def test_training_logs_sample_metrics_without_changing_the_run(tmp_path, monkeypatch):
    # a fresh cache: the classifier is trained mid-run, which must not move the run's RNG
    monkeypatch.setenv("FASTGEN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(dfeat, "_model", None)
    base = ["train", "vae", "--data", "digits", "--epochs", "2", "--batches-per-epoch", "3", "--quiet"]
    assert main(base + ["--out", str(tmp_path / "a"), "--sample-metrics", "40"]) == 0
    assert main(base + ["--out", str(tmp_path / "b")]) == 0
    rows = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]
    assert all({"fd", "precision", "recall", "coverage", "class_coverage"} <= set(r) for r in rows)
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
