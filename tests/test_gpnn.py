"""GPNN (fastgen.models.gpnn), its CLI and its distributed runner, on CI-sized images.

china.jpg shrunk to 40x60 (4 pyramid levels) with 2-3 iterations per level: each
sample takes well under a second on a laptop core.
"""
import os
import socket

import pytest
import torch
import torch.nn.functional as F

from fastgen.models.gpnn import GPNN, _patches, _resize
from fastgen.ops import knn

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def china():
    from sklearn.datasets import load_sample_image
    x = torch.from_numpy(load_sample_image("china.jpg").copy()).permute(2, 0, 1).float() / 255
    return F.interpolate(x[None], size=(40, 60), mode="bicubic", antialias=True)[0].clamp(0, 1)


@pytest.fixture(scope="module")
def model():
    return GPNN(iterations=3)


@pytest.fixture(scope="module")
def samples(china, model):
    return model.sample(china, num_samples=2, seed=0, progress=False)


def patch_nn_mse(x, source, p=7):
    """Mean over x's patches of the mean squared difference to the nearest source patch."""
    q = _patches(x[None], p)[0]
    k = _patches(source[None], p)[0]
    dist, _ = knn(q, k, 1)
    return float(dist.mean()) / q.shape[1]


# ---------------------------------------------------------------- sampling

def test_sample_is_not_a_copy_but_made_of_source_patches(china, samples):
    assert samples.shape == (2, 3, 40, 60)
    assert samples.dtype == torch.float32
    assert 0 <= float(samples.min()) and float(samples.max()) <= 1     # value range: [0, 1] out
    flipped = patch_nn_mse(china.flip(-1), china)                     # same statistics, other patches
    for s in samples:
        pixel_mse = float((s - china).square().mean())
        assert pixel_mse > 1e-3, f"sample is a copy of the source (pixel MSE {pixel_mse:.2e})"
        nn_mse = patch_nn_mse(s, china)
        # diverse samples (new layouts) have seams a near-copy does not: 3e-3 on this
        # 40 x 60 crop, where the source's own flip is ~9e-3
        assert nn_mse < 3e-3 and nn_mse < 0.35 * flipped, \
            f"sample patches are far from the source's: {nn_mse:.2e} (flipped source: {flipped:.2e})"


def test_seeds(china, model, samples):
    again = model.sample(china, num_samples=1, seed=0, progress=False)
    assert torch.equal(again[0], samples[0]), "same seed gave a different sample"
    assert float((samples[0] - samples[1]).square().mean()) > 1e-4, "two seeds gave the same sample"
    # sample i of seed s is the sample of seed s + i, whatever the batch (distributed runs rely on it)
    one = model.sample(china, num_samples=1, seed=1, progress=False)
    assert torch.equal(one[0], samples[1])


def test_seed_none_follows_torch_manual_seed(china):
    g = GPNN(iterations=1)
    torch.manual_seed(3)
    a = g.sample(china, progress=False)
    torch.manual_seed(3)
    assert torch.equal(a, g.sample(china, progress=False))


def test_output_size(china, model):
    out = model.sample(china, num_samples=1, output_size=(30, 80), seed=0, progress=False)
    assert out.shape == (1, 3, 30, 80)


# ---------------------------------------------------------------- documented choices

def test_pyramid_coarsest_side_ratio_and_aspect(china, model):
    pyr = model._source_pyramid(china)
    shapes = [tuple(s.shape[-2:]) for s in pyr]
    assert shapes[0] == (40, 60) and min(shapes[-1]) == model.coarsest_side
    for (h0, w0), (h1, w1) in zip(shapes, shapes[1:]):
        assert 1 < h0 / h1 <= 4 / 3 + 0.05                             # rounding to whole pixels
        assert abs(w1 / h1 - 60 / 40) < 0.1                            # aspect kept
    assert len(GPNN()._source_pyramid(torch.rand(3, 12, 30))) == 1    # short side <= 14: one level


@pytest.mark.parametrize("diversity", [1.0, 0.0])
def test_the_start_is_the_documented_recipe(china, diversity):
    """X_L = w S_L + (1 - w) 0.5 + resize(N(0, noise_std^2) drawn at full size), w = 0.15
    (1 - diversity)^2: the first search sees exactly that (folded back from its queries)."""
    import torch.nn.functional as F
    from fastgen.models.gpnn import SOURCE_WEIGHT
    first = {}

    def record(lvl, it, queries, idx, index):
        first.setdefault("queries", queries.clone())
    g = GPNN(iterations=1, diversity=diversity, on_search=record)
    g.sample(china, num_samples=2, seed=0, progress=False)
    coarse = g._source_pyramid(china)[-1]                              # (1, 3, 14, 21)
    size = tuple(coarse.shape[-2:])
    cols = first["queries"].transpose(1, 2)
    init = F.fold(cols, size, 7) / F.fold(torch.ones_like(cols), size, 7)
    w = SOURCE_WEIGHT * (1 - diversity) ** 2
    noise = init - (w * coarse + (1 - w) * 0.5)                        # (2, 3, 14, 21), not clamped
    expect = torch.stack([torch.randn(3, 40, 60, generator=torch.Generator().manual_seed(s)) for s in (0, 1)])
    expect = 0.375 * F.interpolate(expect, size=size, mode="bicubic", align_corners=False, antialias=True)
    torch.testing.assert_close(noise, expect, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(noise[:, 0], noise[:, 1])                # per channel, as the public code
    assert not torch.allclose(noise[0], noise[1])                      # each sample its own noise


def test_alpha_is_in_mean_squared_difference_units(china):
    alphas = []
    record = lambda lvl, it, q, idx, index: alphas.append((lvl, index.alpha))   # noqa: E731
    g = GPNN(iterations=2, alpha=0.01, coarse_alpha=None, on_search=record)
    g.sample(china, seed=0, progress=False)
    assert alphas and all(a == pytest.approx(0.01 * 3 * 7 * 7) for _, a in alphas)
    alphas.clear()
    GPNN(iterations=2, alpha=None, coarse_alpha=None, on_search=record).sample(china, seed=0, progress=False)
    assert alphas and all(a is None for _, a in alphas)
    # the default: the public code's alpha at the coarsest level of a sample, alpha elsewhere
    alphas.clear()
    g = GPNN(iterations=2, alpha=0.01, on_search=record)
    g.sample(china, seed=0, progress=False)
    top = len(g._source_pyramid(china)) - 1
    assert any(lvl == top for lvl, _ in alphas) and any(lvl != top for lvl, _ in alphas)
    assert all(a == pytest.approx((0.00125 if lvl == top else 0.01) * 3 * 7 * 7) for lvl, a in alphas)
    # tasks whose start is not noise use alpha everywhere
    alphas.clear()
    g.retarget(china, (40, 70), progress=False)
    assert alphas and all(a == pytest.approx(0.01 * 3 * 7 * 7) for _, a in alphas)


# ---------------------------------------------------------------- other tasks

def test_retarget_size(china, model):
    out = model.retarget(china, (32, 90), progress=False)
    assert out.shape == (1, 3, 32, 90)
    assert patch_nn_mse(out[0], china) < 2e-3


def test_inpaint_keeps_pixels_outside_the_mask(china, model):
    mask = torch.zeros(40, 60)
    mask[10:24, 25:40] = 1
    out = model.inpaint(china, mask, seed=0, progress=False)
    assert out.shape == (1, 3, 40, 60)
    keep = ~mask.bool()
    assert torch.equal(out[0][:, keep], china[:, keep])
    assert float((out[0] - china)[:, mask.bool()].abs().mean()) > 1e-3   # the hole was regenerated
    assert torch.equal(out, model.inpaint(china, mask[None].bool(), seed=0, progress=False))


@pytest.mark.parametrize("incremental", [True, False])
@pytest.mark.parametrize("task", ["sample", "inpaint"])
def test_sharp_key_searches_reach_the_optimum(china, task, incremental):
    # iterations 1.. of a level search the sharp keys through one PatchIndex: incrementally
    # (patch_nn's answers, recomputing only what the changed queries affect), or from
    # scratch with the previous iteration's answers as hint. Every search is judged
    # against the float64 optimum like patch_nn itself, also with a mask (subset keys and
    # queries); the stats show which path really ran
    from helpers import judge
    mask = torch.zeros(40, 60)
    mask[10:24, 25:40] = 1
    calls = []

    def record(lvl, it, queries, idx, index):
        calls.append((it, queries.clone(), index.keys, index.alpha, idx))

    # (coarse_alpha=None: alpha at every level; with the public code's small alpha at the
    # top, this sample's iterations move too many queries for any update to be incremental)
    model = GPNN(iterations=6, coarse_iterations=6, incremental=incremental,  # a small hole changes most
                 on_search=record, coarse_alpha=None)
    if task == "sample":                                                  # of its queries early on
        model.sample(china, num_samples=2, seed=3, progress=False)
    else:
        model.inpaint(china, mask, seed=3, progress=False)
    sharp = [s for _, kind, s in model.search_stats if kind == "sharp"]
    assert sharp and all(s.searches == 5 for s in sharp)
    assert all(s.pairs_total > 0 for s in sharp), "a sharp-key search did not take the pruned path"
    assert sum(s.pairs_computed for s in sharp) < sum(s.pairs_total for s in sharp)
    if incremental:
        assert sum(s.incremental for s in sharp) > 0, "every search started from scratch"
    else:
        assert all(s.incremental == 0 for s in sharp)
    assert any(it > 0 for it, *_ in calls)
    for _, q, k, alpha, idx in calls:
        for b in range(q.shape[0]):
            judge(q[b], k, alpha, idx[b])


def test_search_stats_report_every_level(china):
    g = GPNN(iterations=3)                       # coarse_iterations=1: no sharp search at the top
    g.sample(china, num_samples=1, seed=0, progress=False)
    levels = len(g._source_pyramid(china))
    assert [(lvl, kind) for lvl, kind, _ in g.search_stats] == \
        [(levels - 1, "blurred")] + [(lvl, kind) for lvl in reversed(range(levels - 1)) for kind in ("blurred", "sharp")]
    for _, kind, s in g.search_stats:
        assert s.searches == (1 if kind == "blurred" else 2)
        assert 0 < s.fraction_computed <= 1


def test_inpaint_mask_covering_everything(china, model):
    with pytest.raises(ValueError, match="mask leaves no"):
        model.inpaint(china, torch.ones(40, 60), progress=False)


def test_analogy_has_the_structure_images_size(china, model):
    structure = _resize(china.flip(-1)[None], (36, 44))[0]
    out = model.analogy(structure, china, progress=False)
    assert out.shape == (1, 3, 36, 44)
    assert patch_nn_mse(out[0], china) < 5e-3


# ---------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("call, exc, match", [
    (lambda g, x: g.sample(x[0]), ValueError, r"image must be a \(C, H, W\)"),
    (lambda g, x: g.sample(x[None]), ValueError, r"image must be a \(C, H, W\)"),
    (lambda g, x: g.sample(x[:, :5, :6]), ValueError, "image is 5x6, smaller than one 7x7 patch"),
    (lambda g, x: g.sample(torch.where(x > 0.5, float("nan"), x)), ValueError, "image contains NaN"),
    (lambda g, x: g.sample(x * 255), ValueError, r"image must have values in \[0, 1\]"),
    (lambda g, x: g.sample((x * 255).to(torch.uint8)), TypeError, "image must be a float tensor"),
    (lambda g, x: g.sample(x.numpy()), TypeError, "image must be a torch.Tensor"),
    (lambda g, x: g.sample(x, num_samples=0), ValueError, "num_samples"),
    (lambda g, x: g.sample_seeds(x, []), ValueError, "seeds must be a non-empty list"),
    (lambda g, x: g.sample(x, seed=1.5), TypeError, "seed must be an int"),
    (lambda g, x: g.sample(x, output_size=(5, 40)), ValueError, "output_size"),
    (lambda g, x: g.retarget(x, (30,)), ValueError, "size must be a pair"),
    (lambda g, x: g.inpaint(x, torch.zeros(40, 61)), ValueError, "mask must be"),
    (lambda g, x: g.inpaint(x, torch.full((40, 60), float("nan"))), ValueError, "mask contains NaN"),
    (lambda g, x: g.analogy(x[:1], x), ValueError, "structure_image has 1 channels"),
    (lambda g, x: g.analogy(x, x * float("nan")), ValueError, "patch_image contains NaN"),
    (lambda g, x: g.edit(x, x[:2]), ValueError, "edited has 2 channels but image has 3"),
    (lambda g, x: g.edit(x * float("nan"), x), ValueError, "image contains NaN"),
])
def test_bad_inputs_name_the_argument(china, call, exc, match):
    with pytest.raises(exc, match=match):
        call(GPNN(iterations=1), china)


@pytest.mark.parametrize("kwargs, match", [
    ({"patch_size": 0}, "patch_size"), ({"pyramid_ratio": 1.0}, "pyramid_ratio"),
    ({"coarsest_side": 5}, "coarsest_side"), ({"iterations": 0}, "iterations"),
    ({"alpha": -1}, "alpha"), ({"noise_std": float("nan")}, "noise_std"),
    ({"coarse_alpha": 0.0}, "coarse_alpha"), ({"coarse_alpha": float("inf")}, "coarse_alpha"),
])
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GPNN(**kwargs)


@pytest.mark.parametrize("name", ["alpha", "coarse_alpha"])
@pytest.mark.parametrize("value", [True, "0.1", [0.1]])
def test_alpha_of_the_wrong_type_names_the_argument(name, value):
    with pytest.raises(TypeError, match=f"^{name} must be a number or None"):
        GPNN(**{name: value})


@pytest.mark.parametrize("kwargs, match", [({"incremental": 1}, "incremental"), ({"on_search": 3}, "on_search")])
def test_bad_setting_types(kwargs, match):
    with pytest.raises(TypeError, match=match):
        GPNN(**kwargs)


def test_incremental_where_the_backend_cannot_raises(china):
    with pytest.raises(ValueError, match="incremental=True needs"):
        GPNN(iterations=2, incremental=True, backend="torch").sample(china, seed=0, progress=False)


# ---------------------------------------------------------------- CLI

@pytest.fixture()
def tiny_png(tmp_path, china):
    from fastgen.images import save_image
    return save_image(_resize(china[None], (24, 36))[0], str(tmp_path / "tiny.png"))


def test_cli_writes_pngs(tmp_path, tiny_png):
    from fastgen.cli import main
    from fastgen.images import load_image
    out = tmp_path / "out"
    fast = ["--iterations", "1", "--no-progress"]
    assert main(["gpnn", "sample", tiny_png, "-n", "2", "--out", str(out), *fast]) == 0
    for name in ["tiny_sample0000.png", "tiny_sample0001.png", "tiny_sheet.png"]:
        assert (out / name).is_file(), name
    assert load_image(str(out / "tiny_sample0000.png")).shape == (3, 24, 36)

    assert main(["gpnn", "retarget", tiny_png, "--size", "20x50", "--out", str(out), *fast]) == 0
    assert load_image(str(out / "tiny_retarget_20x50.png")).shape == (3, 20, 50)
    assert (out / "tiny_retarget_20x50_sheet.png").is_file()

    from PIL import Image
    import numpy as np
    m = np.zeros((24, 36), np.uint8)
    m[8:16, 12:24] = 255
    Image.fromarray(m).save(tmp_path / "mask.png")
    assert main(["gpnn", "inpaint", tiny_png, "--mask", str(tmp_path / "mask.png"), "--out", str(out), *fast]) == 0
    inp = load_image(str(out / "tiny_inpaint.png"))
    src = load_image(tiny_png)
    keep = torch.from_numpy(m == 0)
    assert torch.equal(inp[:, keep], src[:, keep])          # exact through 8-bit PNGs too
    assert (out / "tiny_inpaint_sheet.png").is_file()

    assert main(["gpnn", "analogy", tiny_png, str(out / "tiny_retarget_20x50.png"), "--out", str(out), *fast]) == 0
    assert load_image(str(out / "tiny_retarget_20x50_as_tiny_analogy.png")).shape == (3, 20, 50)

    assert main(["gpnn", "edit", tiny_png, str(out / "tiny_retarget_20x50.png"), "--out", str(out), *fast]) == 0
    assert load_image(str(out / "tiny_retarget_20x50_edit.png")).shape == (3, 20, 50)
    assert (out / "tiny_retarget_20x50_edit_sheet.png").is_file()


def test_cli_errors(tmp_path, tiny_png, capsys):
    from fastgen.cli import main
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    assert main(["gpnn", "sample", str(bad), "--out", str(tmp_path), "--no-progress"]) == 2
    assert "cannot read image" in capsys.readouterr().err
    assert main(["gpnn", "sample", str(tmp_path / "missing.png"), "--out", str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["gpnn", "retarget", tiny_png, "--size", "20by50", "--out", str(tmp_path)]) == 2
    assert "--size must look like HxW" in capsys.readouterr().err
    from PIL import Image
    Image.new("L", (10, 12)).save(tmp_path / "small_mask.png")
    assert main(["gpnn", "inpaint", tiny_png, "--mask", str(tmp_path / "small_mask.png"), "--out", str(tmp_path)]) == 2
    assert "--mask is 12x10 but the image is 24x36" in capsys.readouterr().err
    assert main(["gpnn", "sample", "--images", str(tmp_path / "nowhere"), "--out", str(tmp_path)]) == 2
    assert "--images" in capsys.readouterr().err


# ---------------------------------------------------------------- distributed

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_two_gloo_ranks_write_every_job_once(tmp_path, china):
    import torch.multiprocessing as mp
    from fastgen import gpnn_distributed as gd
    from fastgen.images import load_image, save_image
    images = tmp_path / "images"
    paths = [save_image(_resize(china[None], (24, 36))[0], str(images / "a.png")),
             save_image(_resize(china.flip(-1)[None], (22, 30))[0], str(images / "b.png"))]
    assert gd.image_files(str(images)) == paths
    out, results = tmp_path / "out", tmp_path / "results"
    results.mkdir()
    model = dict(iterations=1)
    kwargs = dict(model=model, max_side=0, paths=paths, num_samples=3, out=str(out), seed=7, batch=2)
    mp.spawn(gd._spawned_worker, args=(2, _free_port(), kwargs, str(results)), nprocs=2, join=True)

    written = []
    for r in range(2):
        written += [p for p in (results / f"rank{r}.txt").read_text().splitlines() if p]
    expected = [gd.sample_path(str(out), n, i) for n in ("a", "b") for i in range(3)]
    assert sorted(written) == sorted(expected), "a job ran twice or not at all"
    assert all(os.path.isfile(p) for p in expected)
    assert (out / "a_sheet.png").is_file() and (out / "b_sheet.png").is_file()
    # outputs do not depend on the split: job (b, 2) equals a one-process sample of seed 7 + 2
    ref = GPNN(**model).sample_seeds(load_image(paths[1]), [9], progress=False)[0]
    assert torch.equal(load_image(expected[5]), (ref * 255 + 0.5).floor() / 255)
    # a rerun skips the jobs already done
    assert gd.run_samples(GPNN(**model), paths, load_image, 3, str(out), seed=7, progress=False) == []


def test_rank_jobs_partition():
    from fastgen.gpnn_distributed import rank_jobs
    jobs = [j for r in range(3) for j in rank_jobs(4, 5, r, 3)]
    assert sorted(jobs) == [(k, i) for k in range(4) for i in range(5)]


def test_the_level_profile_accounts_for_every_search():
    """benchmarks/gpnn_levels.py: one sample's searches per level, timed without changing
    the model (the wrapped PatchIndex and fold_patches are put back)."""
    import importlib.util
    import os

    import fastgen.models.gpnn as gm
    spec = importlib.util.spec_from_file_location(
        "gpnn_levels", os.path.join(os.path.dirname(__file__), "..", "benchmarks", "gpnn_levels.py"))
    prof = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prof)
    image = torch.rand(3, 40, 56)
    before = gm.PatchIndex, gm.fold_patches
    rows, total, out = prof.profile(image, iterations=3, coarsest_side=14)
    assert (gm.PatchIndex, gm.fold_patches) == before
    assert torch.equal(out, GPNN(iterations=3, coarsest_side=14).sample(image, seed=0, progress=False))
    assert [r["searches"] for r in rows] == [1] + [3] * (len(rows) - 1)
    for r in rows:
        assert r["brute_gflop"] == round(2 * r["queries"] * r["keys"] * r["D"] * r["searches"] / 1e9, 2)
        assert r["pairs_computed"] is None or 0 < r["pairs_computed"] <= 1
    assert rows[-1]["level"] == "40x56"
    assert 0 < sum(r["build_s"] + r["search_s"] + r["fold_s"] for r in rows) <= total
