"""fastgen.metrics.pixel_diversity (the papers' measure, against a float64 transcription
of GPDM's compute_pixel_diversity) and patch_swd (against an exact 1-D Wasserstein
distance per projection)."""
import pytest
import torch
import torch.nn.functional as F

from fastgen.metrics import patch_swd, pixel_diversity


def test_pixel_diversity_is_the_papers_formula():
    torch.manual_seed(0)
    ref = torch.rand(3, 20, 30)
    samples = torch.rand(6, 3, 20, 30)
    want = samples.double().mean(1).std(0).mean() / ref.double().mean(0).std()
    assert pixel_diversity(ref, samples) == pytest.approx(float(want), rel=1e-12)
    assert pixel_diversity(ref, ref.expand(4, -1, -1, -1).contiguous()) == 0.0


@pytest.mark.parametrize("bad,match", [
    (lambda r: pixel_diversity(r, r[None]), "at least 2"),
    (lambda r: pixel_diversity(r, torch.rand(3, 3, 10, 10)), "same place"),
    (lambda r: pixel_diversity(torch.zeros(3, 8, 8), torch.rand(2, 3, 8, 8)), "constant"),
    (lambda r: pixel_diversity(r, torch.full((2, 3, 8, 8), float("nan"))), "NaN"),
    (lambda r: patch_swd(r, torch.rand(1, 8, 8)), "channels"),
    (lambda r: patch_swd(r, torch.rand(3, 5, 5)), "smaller than one 7x7"),
])
def test_bad_inputs(bad, match):
    with pytest.raises(ValueError, match=match):
        bad(torch.rand(3, 8, 8))


def test_patch_swd_matches_the_exact_sliced_distance():
    torch.manual_seed(1)
    x, y = torch.rand(3, 12, 14), torch.rand(3, 12, 14) ** 2
    got = patch_swd(x, y, patch=5, projections=16, seed=3)
    g = torch.Generator().manual_seed(3)
    px = F.unfold(x.double()[None], 5)[0]
    py = F.unfold(y.double()[None], 5)[0]
    dirs = torch.randn(16, px.shape[0], generator=g).double()
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    # equal counts: W1 between the empirical 1-D laws is the mean gap of sorted values
    want = ((dirs @ px).sort(1).values - (dirs @ py).sort(1).values).abs().mean()
    assert got == pytest.approx(float(want), rel=1e-5)
    assert patch_swd(x, x) == 0.0
    shuffled = x[:, :, torch.randperm(14)]          # other patches: a positive distance
    assert patch_swd(x, shuffled) > 0
    assert patch_swd(x, torch.rand(3, 30, 40)) > 0   # other sizes work
