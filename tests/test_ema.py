"""The weight average (fastgen.ema) and the learning-rate schedule of fastgen.training.fit:
the average's formula in float64, its use for evaluation and sampling, and a resumed
run that continues both exactly."""
import math
import os

import pytest
import torch

from fastgen import training
from fastgen.cli import main
from fastgen.ema import WeightAverage, load_average


def test_the_average_follows_its_formula_in_float64():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.BatchNorm1d(3))
    avg = WeightAverage(model, 0.9)
    want = {k: p.detach().double().clone() for k, p in model.named_parameters()}
    for t in range(25):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        avg.update(model)
        d = min(0.9, (1 + t) / (10 + t))
        for k, p in model.named_parameters():
            want[k] = d * want[k] + (1 - d) * p.detach().double()
    for k, v in avg.shadow.items():
        torch.testing.assert_close(v.double(), want[k], rtol=1e-5, atol=1e-6)
    assert set(avg.shadow) == {k for k, _ in model.named_parameters()}   # no buffers averaged
    live = {k: p.detach().clone() for k, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="inside"):
        with avg.applied(model):
            for k, p in model.named_parameters():
                assert torch.equal(p, avg.shadow[k])
            raise RuntimeError("inside")
    for k, p in model.named_parameters():           # restored even after an error
        assert torch.equal(p, live[k])
    other = load_average(torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.BatchNorm1d(3)), avg.state_dict())
    assert all(torch.equal(p, avg.shadow[k]) for k, p in other.named_parameters())


@pytest.mark.parametrize("decay", [0, 1, 1.5, -0.1, True, "0.9"])
def test_bad_decays_are_refused(decay):
    with pytest.raises(ValueError, match="ema decay"):
        WeightAverage(torch.nn.Linear(2, 2), decay)


def test_lr_schedule():
    assert training.lr_factor("constant", 7, 10) == 1.0
    assert training.lr_factor("cosine", 0, 10) == 1.0
    assert training.lr_factor("cosine", 9, 10) == pytest.approx(0.05)
    mid = training.lr_factor("cosine", 5, 11)
    assert mid == pytest.approx(0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert training.lr_factor("cosine", 0, 1) == 1.0
    with pytest.raises(ValueError, match="lr_schedule"):
        training.lr_factor("linear", 0, 3)


def test_the_checkpoint_keeps_the_average_and_sampling_loads_it(tmp_path, capsys):
    # (a resumed run continues the average exactly: tests/test_imle.py, test_resume_continues_exactly)
    args = ["train", "imle", "--data", "digits", "--batches-per-epoch", "4", "--eval-every", "9", "--quiet",
            "--threads", "1", "--samples-per-point", "2", "--staleness", "2", "--lr", "0.002", "--ema", "0.95"]
    full = str(tmp_path / "full")
    assert main([*args, "--epochs", "3", "--out", full]) == 0
    a = training.load_checkpoint(os.path.join(full, "checkpoint.pt"))
    assert a["ema"]["steps"] == 12
    assert a["lr"] == a["base_lr"] == 0.002
    # sampling loads the average; averaged=False the last step's weights
    avg = training.model_from_checkpoint(a)
    last = training.model_from_checkpoint(a, averaged=False)
    name, p = next(iter(avg.named_parameters()))
    assert torch.equal(p, a["ema"]["shadow"][name]) and torch.equal(dict(last.named_parameters())[name],
                                                                    a["model"][name])
    assert not torch.equal(p, a["model"][name])
    capsys.readouterr()
    assert main([*args[:-2], "--ema", "1.5", "--epochs", "1", "--out", str(tmp_path / "bad")]) != 0
    assert "ema decay" in capsys.readouterr().err
    # the cosine schedule (keyed on --epochs: a resumed run given more epochs stretches it)
    cos = str(tmp_path / "cos")
    assert main([*args, "--lr-schedule", "cosine", "--epochs", "3", "--out", cos]) == 0
    c = training.load_checkpoint(os.path.join(cos, "checkpoint.pt"))
    assert c["lr"] == pytest.approx(0.002 * 0.05) and c["base_lr"] == 0.002


class _Line(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3))

    def forward(self, x):
        return {"loss": (x - self.w).square().sum(1).mean()}


def test_fit_evaluates_with_the_average_and_trains_the_live_weights(tmp_path):
    torch.manual_seed(0)
    model, seen = _Line(), []
    data = torch.randn(64, 3) + 5
    training.fit(model, data, kind="line", out=str(tmp_path), epochs=2, config={}, batch_size=8, ema=0.9,
                 show_progress=False, evaluate=lambda: seen.append(model.w.detach().clone()) or {},
                 format_row=lambda row: "")
    ck = training.load_checkpoint(os.path.join(str(tmp_path), "checkpoint.pt"))
    assert len(seen) == 2 and torch.equal(seen[-1], ck["ema"]["shadow"]["w"])
    assert torch.equal(model.w.detach(), ck["model"]["w"]) and not torch.equal(model.w.detach(), seen[-1])
