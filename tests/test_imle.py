"""fastgen.models.IMLE: the search picks each point's exact nearest sample, training on
digits pulls samples onto the data and covers every class, runs resume exactly, bad
input is refused before any step."""
import json
import os

import pytest
import torch
from torch import nn

from fastgen.cli import main
from fastgen.models import IMLE
from fastgen.ops import knn

QUICK = ["--threads", "1", "--quiet"]


def round_codes(model, seed, total):
    """Every code a search round with generator seed `seed` drew, in sample order."""
    rs = model._round_seed(torch.Generator().manual_seed(seed))
    return torch.cat([model._chunk_codes(rs, c, min(model.chunk, total - s), "cpu")
                      for c, s in enumerate(range(0, total, model.chunk))])


def digits():
    from fastgen import data
    return data.load_digits().train


@pytest.mark.parametrize("feature_dim", [None, 12])
def test_search_keeps_each_points_exact_nearest_sample(feature_dim):
    x = torch.rand(57, 1, 4, 4)
    model = IMLE((1, 4, 4), z_dim=5, samples_per_point=7, chunk=33, feature_dim=feature_dim)
    seed = int(torch.randint(0, 2 ** 31, (1,)))
    info = model.search(x, generator=torch.Generator().manual_seed(seed))
    # the same codes, all at once: chunking and streaming must not change the choice
    z = round_codes(model, seed, 57 * 7)
    # round_codes reuses the model's own seeding, so check the codes on their own too:
    # N(0, I) draws, no chunk repeating another, a different round for another seed
    assert z.shape == (57 * 7, 5) and z.unique(dim=0).shape[0] == z.shape[0]
    assert abs(float(z.mean())) < 0.15 and 0.85 < float(z.std()) < 1.15
    assert not torch.equal(z, round_codes(model, seed + 1, 57 * 7))
    with torch.no_grad():
        samples = model.generate(z)
        dist, idx = knn(model.features(x), model.features(samples), 1)
    assert torch.equal(model.chosen_z, z[idx[:, 0]])
    assert info["samples"] == 57 * 7
    assert info["mean_nearest_dist"] == pytest.approx(float(dist.mean()), rel=1e-5)


def test_feature_module_and_custom_generator():
    gen = nn.Sequential(nn.Linear(3, 16), nn.Sigmoid(), nn.Unflatten(1, (1, 4, 4)))
    feat = nn.Sequential(nn.Flatten(), nn.Linear(16, 6))
    model = IMLE((1, 4, 4), z_dim=3, samples_per_point=4, generator=gen, feature=feat)
    x = torch.rand(20, 1, 4, 4)
    model.search(x)
    model.attach(x)
    loss = model(torch.arange(5))["loss"]
    loss.backward()
    assert loss > 0 and gen[0].weight.grad is not None


def test_feature_loss_adds_the_weighted_feature_distance_and_stays_out_of_the_state():
    torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,))))
    gen = nn.Sequential(nn.Linear(3, 16), nn.Sigmoid(), nn.Unflatten(1, (1, 4, 4)))
    feat = nn.Sequential(nn.Flatten(), nn.Linear(16, 5), nn.Tanh())
    x = torch.rand(12, 1, 4, 4)
    losses = []
    for w in (0.0, 0.7):
        model = IMLE((1, 4, 4), z_dim=3, samples_per_point=3, generator=gen, noise=0.0,
                     feature_loss=feat if w else None, feature_loss_weight=w)
        model.attach(x)
        model.search(x)
        losses.append(model(torch.arange(12))["loss"])
        if w:
            assert not any(k.startswith("feature_loss") for k in model.state_dict())
            assert all(p is not feat[1].weight for p in model.parameters())
            out = gen(model.chosen_z)
            pix = (out - x).flatten(1).square().sum(1)
            want = (pix + w * (feat(out) - feat(x)).square().sum(1)).mean()
            torch.testing.assert_close(losses[-1], want)
            # rebuilt from its config without the module (a checkpoint): training says what is missing
            again = IMLE(**model.config, generator=gen)
            again.attach(x)
            again.load_state_dict(model.state_dict())
            with pytest.raises(RuntimeError, match="feature_loss"):
                again(torch.arange(3))
    assert losses[1] > losses[0]
    with pytest.raises(ValueError, match="feature_loss_weight"):
        IMLE((1, 4, 4), feature_loss_weight=-1)


def test_training_pulls_samples_onto_the_data_and_covers_every_digit(tmp_path):
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    out = str(tmp_path / "imle")
    assert main(["train", "imle", "--data", "digits", "--epochs", "40", "--eval-every", "40", "--out", out,
                 *QUICK]) == 0
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rounds = [r["mean_nearest_dist"] for r in map(json.loads, f) if "mean_nearest_dist" in r]
    assert len(rounds) == 8 and rounds[-1] < 0.25 * rounds[0], rounds
    for name in ("samples.png", "nearest.png", "checkpoint.pt"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    # a classifier trained on real digits labels the samples: every class shows up
    d = load_digits()
    clf = LogisticRegression(max_iter=2000).fit(d.data / 16.0, d.target)
    assert main(["sample", "imle", "--checkpoint", os.path.join(out, "checkpoint.pt"), "--out",
                 str(tmp_path / "s"), "-n", "500"]) == 0
    samples = torch.load(tmp_path / "s" / "samples.pt")
    labels = clf.predict(samples.flatten(1).numpy())
    counts = torch.bincount(torch.from_numpy(labels), minlength=10)
    assert (counts >= 10).all(), counts.tolist()


def test_resume_continues_exactly(tmp_path):
    """The weights, and the weight average (--ema), of a run stopped and resumed equal the
    uninterrupted run's."""
    args = ["train", "imle", "--data", "digits", "--batches-per-epoch", "4", "--staleness", "2",
            "--samples-per-point", "3", "--eval-every", "99", "--ema", "0.95", *QUICK]
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    assert main([*args, "--epochs", "5", "--out", full]) == 0
    assert main([*args, "--epochs", "3", "--out", split]) == 0
    assert main([*args, "--epochs", "5", "--out", split, "--resume"]) == 0
    a = torch.load(os.path.join(full, "checkpoint.pt"))
    b = torch.load(os.path.join(split, "checkpoint.pt"))
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], rtol=1e-5, atol=1e-6), k
    assert a["ema"]["steps"] == b["ema"]["steps"] == 20
    for k, v in a["ema"]["shadow"].items():
        torch.testing.assert_close(v, b["ema"]["shadow"][k], rtol=1e-5, atol=1e-6)


def test_resumed_at_an_epoch_without_a_search_logs_what_the_full_run_logs(tmp_path):
    """last_search was not in the checkpoint: a run resumed at an epoch without a search
    round logged "last_mean_nearest_dist": null where the uninterrupted run logged the
    last round's value. Same keys, same non-null values now (seconds aside)."""
    args = ["train", "imle", "--data", "digits", "--batches-per-epoch", "2", "--staleness", "2",
            "--samples-per-point", "2", "--eval-every", "1", *QUICK]
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    assert main([*args, "--epochs", "4", "--out", full]) == 0
    assert main([*args, "--epochs", "3", "--out", split]) == 0
    assert main([*args, "--epochs", "4", "--out", split, "--resume"]) == 0   # epoch 4: no search

    def rows(out):
        with open(os.path.join(out, "metrics.jsonl")) as f:
            return [json.loads(line) for line in f]
    a, b = rows(full), rows(split)
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b] == [1, 2, 3, 4]
    assert "searched" not in a[3] and "searched" in a[2]     # epoch 4 has no search round
    for ra, rb in zip(a, b):
        assert sorted(ra) == sorted(rb), (ra, rb)
        assert [k for k, v in rb.items() if v is None] == [k for k, v in ra.items() if v is None] == []
        for k, v in ra.items():
            if not k.startswith("seconds"):
                assert rb[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
    assert b[3]["last_mean_nearest_dist"] == b[2]["mean_nearest_dist"]


@pytest.mark.parametrize("call, exc, msg", [
    (lambda: IMLE((1, 8, 8), samples_per_point=0), ValueError, "samples_per_point"),
    (lambda: IMLE((1, 8, 8), z_dim=1.5), ValueError, "z_dim"),
    (lambda: IMLE((1, 8, 8), loss="l3"), ValueError, "loss"),
    (lambda: IMLE((1, 8, 8), noise=float("nan")), ValueError, "noise"),
    (lambda: IMLE((1, 8, 8), feature_dim=0), ValueError, "feature_dim"),
    (lambda: IMLE((1, 8, 8), reject_eps=0.0), ValueError, "reject_eps"),
    (lambda: IMLE((1, 8, 8), adaptive_gamma=1.0), ValueError, "adaptive_gamma"),
    (lambda: IMLE((1, 8, 8), adaptive_gamma=0.1, adaptive_wait=0), ValueError, "adaptive_wait"),
    (lambda: IMLE((1, 8, 8), adaptive_gamma=0.1, adaptive_period=0), ValueError, "adaptive_period"),
    (lambda: IMLE((1, 8, 8), adaptive_gamma=0.1, adaptive_wait=3, adaptive_period=2), ValueError, "adaptive_period"),
    (lambda: IMLE((1, 8, 8)).search(torch.rand(0, 1, 8, 8)), ValueError, "data is empty"),
    (lambda: IMLE((1, 8, 8)).search(torch.full((4, 1, 8, 8), float("nan"))), ValueError, "data contains NaN"),
    (lambda: IMLE((1, 8, 8)).search(torch.rand(4, 1, 6, 6)), ValueError, r"data has images of shape \(1, 6, 6\)"),
    (lambda: IMLE((1, 4, 4), z_dim=2, generator=nn.Sequential(nn.Linear(2, 9), nn.Unflatten(1, (1, 3, 3))))
     .search(torch.rand(4, 1, 4, 4)), ValueError, r"generator makes samples of shape \(1, 3, 3\)"),
    (lambda: IMLE((1, 4, 4), feature=nn.Flatten(0)).search(torch.rand(4, 1, 4, 4)), ValueError,
     "feature must map a batch of"),
    (lambda: IMLE((1, 4, 4)).attach(torch.rand(3, 1, 4, 4))(torch.arange(2)), RuntimeError, "call search"),
])
def test_bad_inputs(call, exc, msg):
    with pytest.raises(exc, match=msg):
        call()


def test_feature_loss_flags_are_checked(tmp_path, capsys):
    base = ["train", "imle", "--data", "digits", "--epochs", "1", "--batches-per-epoch", "1", "--out",
            str(tmp_path / "x"), *QUICK]
    for bad, msg in ((["--feature-loss", "digits", "--feature-loss-weight", "0"], "--feature-loss-weight must be"),
                     (["--feature-loss-weight", "0.5"], "needs --feature-loss")):
        assert main([*base, *bad]) != 0
        assert msg in capsys.readouterr().err


def test_cli_bad_arguments(tmp_path, capsys):
    assert main(["train", "imle", "--data", "digits", "--epochs", "1", "--samples-per-point", "0",
                 "--out", str(tmp_path / "a")]) == 2
    assert "--samples-per-point must be >= 1" in capsys.readouterr().err


def test_rejection_discards_samples_near_the_data():
    x = torch.rand(40, 1, 4, 4)
    model = IMLE((1, 4, 4), z_dim=4, samples_per_point=6, chunk=50)
    seed = int(torch.randint(0, 2 ** 31, (1,)))
    z = round_codes(model, seed, 240)
    with torch.no_grad():
        f = model.features(model.generate(z))
        fx = model.features(x)
        near = knn(f, fx, 1).dist[:, 0]
    eps = float(near.sqrt().median())                       # about half the samples go
    model.reject_eps = eps
    info = model.search(x, generator=torch.Generator().manual_seed(seed))
    keep = near >= eps ** 2
    assert info["rejected"] == int((~keep).sum()) > 0
    _, idx = knn(fx, f[keep], 1)
    assert torch.equal(model.chosen_z, z[keep][idx[:, 0]])  # the nearest among the kept ones
    model.reject_eps = 1e6
    with pytest.raises(RuntimeError, match="rejected every one"):
        model.search(x)


def test_adaptive_thresholds_search_only_converged_points():
    x = torch.rand(30, 1, 4, 4)
    model = IMLE((1, 4, 4), z_dim=4, samples_per_point=5, adaptive_gamma=0.1)
    first = model.search(x)
    assert first["searched"] == 30 and torch.isfinite(model.threshold).all()
    with torch.no_grad():
        d = (model.features(model.generate(model.chosen_z)) - model.features(x)).square().sum(1)
    assert torch.allclose(model.threshold, d * 0.81, rtol=1e-4)   # tau = d (1 - gamma), squared
    # pull half the points' samples onto them: exactly those are searched again
    with torch.no_grad():
        before = model.chosen_z.clone()
        model.threshold[::2] = float("inf")
    second = model.search(x)
    assert second["searched"] == 15
    assert torch.equal(model.chosen_z[1::2], before[1::2])


class _Identity(torch.nn.Module):
    """A generator that returns its code as the image: samples land where the codes say."""

    def forward(self, z):
        return z.view(-1, 1, 4, 4)


def test_adaptive_thresholds_only_shrink_from_the_distance_reached():
    # put ten points' chosen codes exactly on their points and search again: the public
    # training loop sets tau_i from the distance the generator had reached (0 here), so
    # no threshold may rise -- before, tau came from the new match (8.99 -> 15.87)
    torch.manual_seed(3)
    x = torch.rand(30, 1, 4, 4)
    model = IMLE((1, 4, 4), z_dim=16, samples_per_point=3, adaptive_gamma=0.1, generator=_Identity())
    model.search(x, generator=torch.Generator().manual_seed(0))
    before = model.threshold.clone()
    with torch.no_grad():
        model.chosen_z[:10] = x[:10].flatten(1)
    info = model.search(x, generator=torch.Generator().manual_seed(1))
    assert info["searched"] >= 10
    assert (model.threshold <= before).all()
    assert (model.threshold[:10] == 0).all()


def test_adaptive_points_wait_and_are_forced_after_the_period():
    torch.manual_seed(4)
    x = torch.rand(20, 1, 4, 4)
    model = IMLE((1, 4, 4), z_dim=16, samples_per_point=2, adaptive_gamma=0.5, generator=_Identity(),
                 adaptive_wait=2, adaptive_period=3)
    model.search(x)                                            # round 0: every point
    with torch.no_grad():
        model.chosen_z[:5] = x[:5].flatten(1)                  # five points reach their target
    assert model.search(x)["searched"] == 0                    # round 1: they wait (adaptive_wait=2)
    assert model.search(x)["searched"] == 5                    # round 2: those five
    # round 3: the fifteen never within their threshold are forced (3 rounds since round 0)
    info = model.search(x)
    assert info["searched"] == 15
    assert (model.last_searched[5:] == 3).all() and (model.last_searched[:5] == 2).all()


def test_adaptive_state_survives_a_checkpoint(tmp_path):
    x = torch.rand(12, 1, 4, 4)
    model = IMLE((1, 4, 4), z_dim=16, samples_per_point=2, adaptive_gamma=0.5, generator=_Identity())
    model.search(x)
    model.search(x)
    other = IMLE((1, 4, 4), z_dim=16, samples_per_point=2, adaptive_gamma=0.5, generator=_Identity())
    other.load_state_dict(model.state_dict())
    assert int(other.rounds) == 2 and torch.equal(other.last_searched, model.last_searched)
    # a checkpoint from before the round counters: every point as searched adaptive_wait
    # rounds before round 0, so the first round after resuming searches converged points
    old = {k: v for k, v in model.state_dict().items() if k not in ("rounds", "last_searched")}
    third = IMLE((1, 4, 4), z_dim=16, samples_per_point=2, adaptive_gamma=0.5, generator=_Identity())
    third.load_state_dict(old)
    assert int(third.rounds) == 0 and torch.equal(third.last_searched, torch.full((12,), -1))
    with torch.no_grad():
        third.chosen_z[:6] = x[:6].flatten(1)
    assert third.search(x)["searched"] >= 6


@pytest.mark.parametrize("variant", [["--reject-eps", "2.0", "--arch", "mlp"], ["--adaptive-gamma", "0.1"], ["--feature-dim", "16"],
                                     ["--arch", "conv", "--size", "16"], ["--loss", "l1"],
                                     ["--conditional", "top-half"], ["--conditional", "top-half", "--adaptive-gamma", "0.1"],
                                     ["--feature-loss", "digits", "--feature-loss-weight", "0.5"]])
def test_each_variant_trains_from_the_cli(tmp_path, variant):
    out = str(tmp_path / "v")
    assert main(["train", "imle", "--data", "digits", "--epochs", "3", "--staleness", "1", "--batches-per-epoch", "3",
                 "--samples-per-point", "2", "--out", out, *variant, *QUICK]) == 0
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 3
    n = rows[0]["searched"]                                   # a fresh run searches every point
    config = torch.load(os.path.join(out, "checkpoint.pt"))["config"]
    if variant[0] == "--reject-eps":
        assert config["reject_eps"] == 2.0 and sum(r["rejected"] for r in rows) > 0
    if variant[0] == "--adaptive-gamma":
        assert config["adaptive_gamma"] == 0.1 and rows[1]["searched"] < n   # unconverged points wait
    if variant[0] == "--feature-dim":
        assert config["feature_dim"] == 16
    if variant[0] == "--feature-loss":
        assert config["feature_loss_weight"] == 0.5
        # a resume rebuilds the feature term from the checkpoint's config
        assert main(["train", "imle", "--resume", "--out", out, "--epochs", "4", "--batches-per-epoch", "3",
                     *QUICK]) == 0
    if variant[0] == "--conditional":
        assert config["condition_shape"] == [1, 8, 8] or config["condition_shape"] == (1, 8, 8)
        assert os.path.exists(os.path.join(out, "completions.png"))
        s_out = str(tmp_path / "s")
        assert main(["sample", "imle", "--checkpoint", os.path.join(out, "checkpoint.pt"), "--out", s_out,
                     "-n", "5", "--nrow", "4"]) == 0
        saved = torch.load(os.path.join(s_out, "samples.pt"))
        assert saved["images"].shape == (20, 1, 8, 8) and saved["conditions"].shape == (5, 1, 8, 8)
        # each row: the input, completions, the truth
        rows = saved["images"].view(5, 4, 1, 8, 8)
        assert torch.equal(rows[:, 0], saved["conditions"]) and torch.equal(rows[:, 3], saved["targets"])


def test_conditional_search_keeps_each_points_nearest_own_sample():
    """Conditional IMLE: point i's samples come from its own input c_i, and the choice is
    the nearest of those (the batched knn), whatever the chunking."""
    gen = nn.Sequential(nn.Flatten(), nn.Linear(3 + 16, 16), nn.Sigmoid(), nn.Unflatten(1, (1, 4, 4)))

    class G(nn.Module):
        def forward(self, z, c):
            return gen(torch.cat([z, c.flatten(1)], 1))
    model = IMLE((1, 4, 4), z_dim=3, samples_per_point=6, chunk=20, generator=G(), condition_shape=(1, 4, 4))
    x, c = torch.rand(23, 1, 4, 4), torch.rand(23, 1, 4, 4)
    seed = int(torch.randint(0, 2 ** 31, (1,)))
    info = model.search(x, generator=torch.Generator().manual_seed(seed), conditions=c)
    g = torch.Generator().manual_seed(seed)
    per = 20 // 6
    z = torch.cat([torch.randn(min(per, 23 - s), 6, 3, generator=g) for s in range(0, 23, per)])   # (23, 6, 3)
    with torch.no_grad():
        samples = model.generate(z.flatten(0, 1), c.repeat_interleave(6, 0)).view(23, 6, 16)
    d = (samples - x.view(23, 1, 16)).square().sum(-1)
    best = d.argmin(1)
    assert torch.equal(model.chosen_z, z[torch.arange(23), best])
    assert info["samples"] == 23 * 6
    assert info["mean_nearest_dist"] == pytest.approx(float(d.min(1).values.mean()), rel=1e-5)
    model.attach(x, c)
    model(torch.arange(4))["loss"].backward()


def test_conditional_training_reduces_the_distance():
    from fastgen.models.imle import top_half
    x = digits()[:300]
    torch.manual_seed(0)
    model = IMLE((1, 8, 8), samples_per_point=5, condition_shape=(1, 8, 8)).attach(x, top_half(x))
    opt = torch.optim.Adam(model.parameters(), 1e-3, betas=(0.5, 0.999))
    first = model.search(x, conditions=model.conditions)["mean_nearest_dist"]
    for step in range(150):
        if step % 30 == 0:
            model.search(x, conditions=model.conditions)
        loss = model(torch.randint(0, 300, (64,)))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = model.search(x, conditions=model.conditions)["mean_nearest_dist"]
    assert last < 0.5 * first, (first, last)


@pytest.mark.parametrize("make, match", [
    (lambda m, x: m.search(x), "needs conditions"),
    (lambda m, x: m.search(x, conditions=torch.rand(3, 1, 4, 4)), "one input per data point"),
    (lambda m, x: m.search(x, conditions=torch.full((5, 1, 4, 4), float("nan"))), "conditions contain NaN"),
    (lambda m, x: IMLE((1, 4, 4)).search(x, conditions=torch.rand(5, 1, 4, 4)), "unconditional"),
    (lambda m, x: IMLE((1, 4, 4), condition_shape=(1, 4, 4), reject_eps=0.1), "reject_eps"),
    (lambda m, x: IMLE((1, 4, 4), condition_shape=(0,)), "condition_shape"),
    (lambda m, x: m.generate(torch.zeros(2, 64)), "needs cond"),
])
def test_conditional_bad_input(make, match):
    model = IMLE((1, 4, 4), condition_shape=(1, 4, 4))
    with pytest.raises(ValueError, match=match):
        make(model, torch.rand(5, 1, 4, 4))


@pytest.mark.parametrize("size,arch", [(None, "conv"), (16, "conv"), (12, "mlp")])
def test_the_default_generator_is_conv_where_the_images_fit_it(tmp_path, size, arch):
    out = str(tmp_path / "a")
    sized = [] if size is None else ["--size", str(size)]
    assert main(["train", "imle", "--data", "digits", *sized, "--epochs", "1", "--batches-per-epoch", "1",
                 "--samples-per-point", "1", "--out", out, *QUICK]) == 0
    assert torch.load(os.path.join(out, "checkpoint.pt"))["config"]["arch"] == arch


def test_noise_once_per_round():
    """noise_per="round": one draw per point per search round (the same loss at every step
    until the next round, seeded by the round number); "step": a fresh draw each step."""
    torch.manual_seed(0)
    x = torch.rand(12, 1, 4, 4)
    losses = {}
    for per in ("step", "round"):
        torch.manual_seed(1)
        m = IMLE((1, 4, 4), z_dim=8, samples_per_point=3, noise=0.5, noise_per=per)
        m.attach(x)
        m.search(x, torch.Generator().manual_seed(0))
        idx = torch.arange(12)
        losses[per] = (m(idx)["loss"].item(), m(idx)["loss"].item())
        if per == "round":
            first = m.round_noise.clone()
            assert first.shape == (12, 8) and 0.3 < float(first.std()) < 0.7
            m.search(x, torch.Generator().manual_seed(1))
            assert not torch.equal(first, m.round_noise)
            # the state carries it: a loaded copy trains on the same noise
            twin = IMLE((1, 4, 4), z_dim=8, samples_per_point=3, noise=0.5, noise_per="round")
            twin.load_state_dict(m.state_dict())
            twin.attach(x)
            assert torch.equal(twin.round_noise, m.round_noise) and float(twin(idx)["loss"]) == float(m(idx)["loss"])
            # a checkpoint from before noise_per: zeros until the next round
            old = {k: v for k, v in m.state_dict().items() if k != "round_noise"}
            twin.load_state_dict(old)
            assert twin.round_noise.shape == (12, 8) and not twin.round_noise.any()
            step = IMLE((1, 4, 4), z_dim=8, samples_per_point=3, noise=0.5)
            step.load_state_dict(old)
            assert step.round_noise.shape == (0, 8)
    assert losses["round"][0] == losses["round"][1]
    assert losses["step"][0] != losses["step"][1]
    with pytest.raises(ValueError, match="noise_per"):
        IMLE((1, 4, 4), noise_per="batch")


def test_noise_per_round_from_the_cli(tmp_path):
    out = str(tmp_path / "r")
    assert main(["train", "imle", "--data", "digits", "--epochs", "2", "--staleness", "1", "--batches-per-epoch", "2",
                 "--samples-per-point", "2", "--noise-per", "round", "--out", out, *QUICK]) == 0
    ck = torch.load(os.path.join(out, "checkpoint.pt"))
    assert ck["config"]["noise_per"] == "round" and ck["model"]["round_noise"].shape[0] == 1438
