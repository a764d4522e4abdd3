"""How single-image generators (GPNN) are judged beside each other: does a sample keep
the source's layout (copying) or rearrange it, do samples differ from each other, and
is every output patch a faithful source patch.

    layout_similarity(x, y)   Pearson correlation of 12 x 8 grey thumbnails (the
                              layout, not the texture): ~1 a copy, ~0 unrelated
    pairwise_diversity(xs)    mean over pairs of the mean absolute pixel difference
    patch_fidelity(x, src)    mean over x's p x p patches (stride 1) of the mean squared
                              difference to the nearest source patch -- exact, on knn
                              (no N x M matrix): 0 when x is made of source patches
    pixel_diversity(ref, xs)  the papers' diversity: per-pixel std over samples / the
                              reference's std (grey)
    patch_swd(x, y)           sliced Wasserstein distance of the two images' p x p patch
                              distributions (random projections, sorted)

SIFID needs an Inception network whose weights cannot be downloaded here; it is not
computed.

Images are (C, H, W) float tensors in [0, 1]; batches (B, C, H, W) where noted.
"""
import itertools

import torch
import torch.nn.functional as F

THUMB = (8, 12)   # (H, W) of the layout thumbnails


def _check(x, name, ndim=3):
    if not isinstance(x, torch.Tensor) or x.dim() != ndim or not x.is_floating_point():
        raise ValueError(f"{name} must be a float ({'B, ' if ndim == 4 else ''}C, H, W) tensor in [0, 1], "
                         f"got {getattr(x, 'shape', type(x))}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values")


def _check_patch_pair(x, x_name, y, y_name, patch):
    """Two images compared by their p x p patches: valid, same channels, each at least
    one patch large."""
    _check(x, x_name)
    _check(y, y_name)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{x_name} has {x.shape[0]} channels but {y_name} has {y.shape[0]}")
    for t, name in ((x, x_name), (y, y_name)):
        if min(t.shape[-2:]) < patch:
            raise ValueError(f"{name} is smaller than one {patch}x{patch} patch")


def thumbnail(x, size=THUMB):
    """(C, H, W) -> (h, w) grey thumbnail (area average): the image's coarse layout."""
    _check(x, "x")
    grey = x.float().mean(0, keepdim=True)[None]
    return F.adaptive_avg_pool2d(grey, size)[0, 0]


def layout_similarity(x, y, size=THUMB):
    """Pearson correlation of the grey thumbnails of x and y (any sizes): how much x keeps
    y's layout. 1: the same arrangement; ~0: unrelated; a constant thumbnail gives 0."""
    a, b = thumbnail(x, size).flatten().double(), thumbnail(y, size).flatten().double()
    a, b = a - a.mean(), b - b.mean()
    den = a.norm() * b.norm()
    return float((a @ b) / den) if den > 0 else 0.0


def pairwise_diversity(samples):
    """Mean over all pairs of samples (B >= 2, same size) of their mean absolute pixel
    difference, in [0, 1] units."""
    _check(samples, "samples", ndim=4)
    if samples.shape[0] < 2:
        raise ValueError(f"pairwise_diversity needs at least 2 samples, got {samples.shape[0]}")
    d = [float((samples[i] - samples[j]).abs().mean()) for i, j in itertools.combinations(range(samples.shape[0]), 2)]
    return sum(d) / len(d)


def patch_fidelity(x, source, patch=7):
    """Mean over the p x p patches of x (stride 1) of the mean squared difference (per
    patch entry) to the nearest p x p patch of `source` (exact knn). 0 when every patch of
    x occurs in the source; a blurred or invented patch raises it."""
    from fastgen.ops import knn
    _check_patch_pair(x, "x", source, "source", patch)
    q = F.unfold(x.float()[None], patch)[0].T.contiguous()
    k = F.unfold(source.float()[None], patch)[0].T.contiguous()
    return float(knn(q, k, 1).dist.double().mean() / q.shape[1])


def pixel_diversity(reference, samples):
    """The single-image papers' diversity (SinGAN, GPNN, GPDM's
    tests/reproduce_paper_table.py): the std over the N samples of each grey pixel
    (unbiased), averaged over pixels, divided by the std over the pixels of the grey
    reference. Grey = the channel mean. 0: every sample the same image; GPNN's samples
    score about 0.5 in those papers' tables. samples (N >= 2, C, H, W), reference (C, H, W)
    of the same size."""
    _check(reference, "reference")
    _check(samples, "samples", ndim=4)
    if samples.shape[0] < 2:
        raise ValueError(f"pixel_diversity needs at least 2 samples, got {samples.shape[0]}")
    if tuple(samples.shape[1:]) != tuple(reference.shape):
        raise ValueError(f"samples are {tuple(samples.shape[1:])} but reference is {tuple(reference.shape)}: "
                         "the measure compares pixels at the same place")
    ref_std = reference.double().mean(0).std()
    if float(ref_std) == 0:
        raise ValueError("reference is a constant image: its diversity is undefined")
    return float(samples.double().mean(1).std(0).mean() / ref_std)


def patch_swd(x, y, patch=7, projections=64, seed=0):
    """Sliced Wasserstein distance between the p x p patch distributions (stride 1) of two
    images (C, H, W) of any sizes: the mean over `projections` random unit directions of
    the mean absolute difference between the sorted projections (quantiles matched where
    the patch counts differ). 0 for the same patch multiset; it grows as x's patches drift
    from y's. Deterministic for a seed (the directions); no N x M matrix."""
    _check_patch_pair(x, "x", y, "y", patch)
    px = F.unfold(x.float()[None], patch)[0]                   # (D, Nx)
    py = F.unfold(y.float()[None], patch)[0]
    g = torch.Generator().manual_seed(int(seed))
    dirs = torch.randn(projections, px.shape[0], generator=g).to(px.device)
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    a, b = (dirs @ px).sort(1).values, (dirs @ py).sort(1).values
    if a.shape[1] != b.shape[1]:
        # the larger set's quantiles at the smaller one's positions
        n = min(a.shape[1], b.shape[1])
        pos = torch.linspace(0, 1, n, device=a.device)
        a = a[:, (pos * (a.shape[1] - 1)).round().long()]
        b = b[:, (pos * (b.shape[1] - 1)).round().long()]
    return float((a - b).abs().mean())
