"""GPNN quality (issue 14): the measures on images where the answer is known, and GPNN's
defaults judged by them -- diverse samples, an analogy that keeps B's structure."""
import pytest
import torch

from fastgen.metrics import layout_similarity, pairwise_diversity, patch_fidelity
from fastgen.models.gpnn import GPNN


def blocks(order, palette, h=48, w=72, seed=0):
    """A 3 x 4 grid of flat blocks, block i coloured palette[order[i]], plus a faint texture."""
    g = torch.Generator().manual_seed(seed)
    img = torch.empty(3, h, w)
    bh, bw = h // 3, w // 4
    for i, c in enumerate(order):
        r, q = divmod(i, 4)
        img[:, r * bh:(r + 1) * bh, q * bw:(q + 1) * bw] = palette[c].view(3, 1, 1)
    return (img + 0.02 * torch.randn(img.shape, generator=g)).clamp(0, 1)


PALETTE = torch.tensor([[i / 11, (11 - i) / 11 * 0.8, (i % 3) / 3] for i in range(12)])


def test_measures_on_known_answers():
    src = blocks(range(12), PALETTE)
    assert layout_similarity(src, src) == pytest.approx(1.0)
    assert layout_similarity(src, src.flip(-1).flip(-2)) < 0.0          # the layout reversed
    assert layout_similarity(src, torch.full_like(src, 0.3)) == 0.0     # no layout at all
    assert pairwise_diversity(torch.stack([src, src])) == 0.0
    assert pairwise_diversity(torch.stack([src, 1 - src])) == pytest.approx(float((2 * src - 1).abs().mean()))
    assert patch_fidelity(src, src) == pytest.approx(0.0, abs=1e-9)      # every patch is a source patch
    assert patch_fidelity(src.flip(-1), src) > 0                         # the texture is not mirrored
    noise = torch.rand_like(src)
    assert patch_fidelity(noise, src) > 10 * patch_fidelity(src.flip(-1), src)
    with pytest.raises(ValueError, match="at least 2 samples"):
        pairwise_diversity(src[None])
    with pytest.raises(ValueError, match="NaN"):
        layout_similarity(src, torch.full_like(src, float("nan")))


def test_default_samples_rearrange_the_blocks_and_diversity_0_keeps_them():
    src = blocks(range(12), PALETTE)
    diverse = GPNN(iterations=3).sample(src, 3, seed=0, progress=False)
    close = GPNN(iterations=3, diversity=0.0).sample(src, 3, seed=0, progress=False)
    lay_d = [layout_similarity(x, src) for x in diverse]
    lay_c = [layout_similarity(x, src) for x in close]
    assert max(lay_d) < 0.75 and sum(lay_c) / 3 > 0.85 and min(lay_c) > max(lay_d), (lay_d, lay_c)
    assert pairwise_diversity(diverse) > 2 * pairwise_diversity(close)
    # made of the source's patches all the same (seams between blocks cost a little)
    flipped = patch_fidelity(src.flip(-1), src)
    assert all(patch_fidelity(x, src) < flipped for x in diverse)


def test_analogy_keeps_the_structure_images_block_layout():
    a = blocks(range(12), PALETTE, seed=1)                               # the patches
    perm = [11, 3, 7, 0, 9, 1, 5, 10, 2, 8, 4, 6]
    b = blocks(perm, PALETTE.flip(0) * 0.9 + 0.05, seed=2)               # the structure: other layout
    out = GPNN(iterations=3).analogy(b, a, progress=False)[0]
    assert layout_similarity(out, b) > layout_similarity(out, a) + 0.3
    assert patch_fidelity(out, a) < patch_fidelity(b, a)                 # drawn with A's patches


def test_edit_keeps_the_edit_and_redraws_its_seams():
    src = blocks(range(12), PALETTE, seed=3)
    edited = src.roll(27, dims=2).clone()            # every block moved by 1.5 blocks: seams mid-block
    edited[:, 4:20, 30:50] = torch.rand(3, 16, 20, generator=torch.Generator().manual_seed(4))   # pasted noise
    for alpha in (0.005, 0.05):
        out = GPNN(iterations=3, alpha=alpha).edit(src, edited, progress=False)[0]
        assert out.shape == edited.shape
        assert layout_similarity(out, edited) > 0.75 > 0.0 > layout_similarity(out, src)   # the edit's layout stays
        assert patch_fidelity(out, src) < 0.2 * patch_fidelity(edited, src)                # seams and noise redrawn


@pytest.mark.parametrize("bad, match", [(dict(diversity=1.5), "diversity"), (dict(diversity=-0.1), "diversity"),
                                        (dict(coarse_iterations=0), "coarse_iterations")])
def test_bad_knobs(bad, match):
    with pytest.raises(ValueError, match=match):
        GPNN(**bad)
