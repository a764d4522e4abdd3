"""Comparison helpers that say how many elements differ and where, not just False."""
import torch


def mismatch_report(actual, expected, mask):
    bad = mask.nonzero()
    n = bad.shape[0]
    first = [tuple(int(x) for x in row) for row in bad[:5]]
    lines = [f"{n} of {mask.numel()} elements differ; first at {first}"]
    for pos in first:
        lines.append(f"  at {pos}: got {actual[pos].item()!r}, want {expected[pos].item()!r}")
    return "\n".join(lines)


def assert_equal_idx(actual, expected):
    mask = actual != expected
    assert not mask.any(), mismatch_report(actual, expected, mask)


def assert_close(actual, expected, rtol, atol):
    actual, expected = actual.double(), expected.double()
    mask = (actual - expected).abs() > atol + rtol * expected.abs()
    assert not mask.any(), mismatch_report(actual, expected, mask)


def assert_knn_equivalent(q, k, dist, idx, ref_dist, rtol):
    """For approximate backends: same distances rank by rank, and every returned index
    reaches the distance the reference has at that rank (a near-tie may pick another)."""
    assert dist.shape == ref_dist.shape and idx.shape == ref_dist.shape
    assert_close(dist, ref_dist, rtol=rtol, atol=rtol)
    # the index really is at the returned distance (recomputed here in float64)
    if q.dim() == 2:
        q, k, idx3, dist3 = q[None], k[None], idx[None], dist[None]
    else:
        idx3, dist3 = idx, dist
    B, N, K = idx3.shape
    got = (q.double()[:, :, None, :] - torch.gather(
        k.double()[:, None].expand(B, N, *k.shape[1:]), 2,
        idx3[..., None].expand(B, N, K, k.shape[-1]))).square().sum(-1)
    assert_close(got, dist3, rtol=rtol, atol=rtol)
    # no index twice in a row
    s = idx3.sort(-1).values
    assert not (s[..., 1:] == s[..., :-1]).any(), "an index appears twice in one row"


# ---------------------------------------------------------------------------------------
# patch_nn's ground truth (tests/test_patch_nn.py, tests/test_patch_index.py, and GPNN's
# tests): natural patches are full of near-ties, so a choice is judged by the float64
# score it reaches against the float64 optimum within an fp32 (or bf16) error allowance,
# and by index equality only where the optimum beats the runner-up by more than that.

def fp32_allowance(q, k, alpha):
    """Per query: how far an fp32 expansion-form score may sit from the float64 one."""
    from fastgen.ops import reference
    mu = k.double().mean(0)
    qn = (q.double() - mu).norm(dim=1)
    kmax = (k.double() - mu).norm(dim=1).max()
    d_err = 64 * q.shape[1] * 2.0 ** -24 * (qn + kmax) ** 2  # generous fp32 bound on d
    if alpha is None:
        return d_err
    colmin = reference.sqdist_exact(q, k).min(0).values
    return d_err / (alpha + colmin.min())


def image_patches(size, patch=7):
    """(L, 3 * patch * patch) patches of sklearn's china.jpg resized to `size`."""
    import torch.nn.functional as F
    from sklearn.datasets import load_sample_image
    img = torch.from_numpy(load_sample_image("china.jpg").copy()).permute(2, 0, 1).float()[None] / 255
    img = F.interpolate(img, size=size, mode="area")
    return F.unfold(img, patch).transpose(1, 2)[0].contiguous()


def sqdist64(q, k):
    """(N, M) float64 squared distances without an (N, M, D) temporary (direct differences)."""
    return torch.cdist(q.double(), k.double(), compute_mode="donot_use_mm_for_euclid_dist").square()


def scores_and_errors(q, k, alpha, precision="fp32"):
    """float64 scores s = d / (alpha + colmin) (N, M) and, per entry, a first-order bound
    on how far the op's fp32 score may sit from it: d and colmin each off by at most
    e = f (||q - mu|| + max ||k - mu||)^2 (f = (3D + 8) 2^-24 for an fp32 cross term,
    + 2^-7 for bf16 inputs and output; csrc/engine/error_bound.h), plus the rounding of
    the weight and the product."""
    q, k = q.float(), k.float()
    d = sqdist64(q, k)
    colmin = d.min(0).values
    s = d / (alpha + colmin)
    mu = k.double().mean(0)
    qn = (q.double() - mu).norm(dim=1)
    kmax = (k.double() - mu).norm(dim=1).max()
    f = (3 * q.shape[1] + 8) * 2.0 ** -24 + (2.0 ** -7 if precision == "bf16" else 0.0)
    e_d = f * (qn + kmax) ** 2
    e_c = f * (qn.max() + kmax) ** 2
    sigma = (e_d[:, None] + s * e_c) / (alpha + colmin) + 4 * 2.0 ** -24 * s
    return s, sigma


def clear_of_runner_up(q, k, alpha, precision="fp32"):
    """(N,) bool: queries whose float64 best score beats the runner-up by more than twice
    the error bounds of both, so every exact method must pick the optimum there."""
    s, sigma = scores_and_errors(q, k, alpha, precision)
    if s.shape[1] == 1:
        return torch.ones(s.shape[0], dtype=torch.bool)
    top2, j = s.topk(2, dim=1, largest=False)
    return (top2[:, 1] - top2[:, 0]) > 2 * sigma.gather(1, j).sum(1)


def judge(q, k, alpha, idx, precision="fp32", min_clear=0.0):
    """patch_nn's answer idx (N,) checked with per-entry error bounds (scores_and_errors,
    twice over): the float64 score reached by every chosen key is the float64 optimum
    within the bounds of both, and where the optimum is clear of the runner-up the index
    is the optimum's. Returns the clear mask; at least `min_clear` of the queries must be
    clear."""
    s, sigma = scores_and_errors(q, k, alpha, precision)
    best, ref_idx = s.min(1)
    reached = s.gather(1, idx[:, None])[:, 0]
    slack = 2 * (sigma.gather(1, idx[:, None])[:, 0] + sigma.gather(1, ref_idx[:, None])[:, 0])
    bad = reached > best + slack
    if bad.any():
        i = int(bad.nonzero()[0])
        raise AssertionError(f"{int(bad.sum())} of {len(bad)} queries miss the optimum score by more than "
                             f"{precision} rounding allows; first: query {i} picks {int(idx[i])} "
                             f"(score {float(reached[i]):.9g}), optimum {int(ref_idx[i])} ({float(best[i]):.9g}), "
                             f"allowance {float(slack[i]):.3g}")
    clear = torch.ones_like(best, dtype=torch.bool)
    if s.shape[1] > 1:
        top2, j = s.topk(2, dim=1, largest=False)
        clear = (top2[:, 1] - top2[:, 0]) > 2 * sigma.gather(1, j).sum(1)
    assert_equal_idx(idx[clear], ref_idx[clear])
    assert clear.float().mean() >= min_clear, f"only {float(clear.float().mean()):.2f} of the queries are clear"
    return clear


def blobs(n, m, d, centres=12, sigma=0.5, scale=4.0, uncovered=0):
    """Queries and keys around a few far-apart centres: most distances can be skipped. With
    `uncovered`, that many key blobs get no queries: their keys' large column minima
    (small weights) draw queries from far away, as uncovered source regions do in GPNN."""
    c = scale * torch.randn(centres, d)
    return (c[torch.randint(0, centres - uncovered, (n,))] + sigma * torch.randn(n, d),
            c[torch.randint(0, centres, (m,))] + sigma * torch.randn(m, d))


def symmetric_integer_keys(base):
    """Keys and their negatives: the keys' mean is exactly 0, so with small integers every
    distance, column minimum and score is exact in fp32 and equal scores really are equal."""
    return torch.cat([base, -base])


# FASTGEN_PRUNE=QUERY_BLOCKxMAX_BALLxBATCH (csrc/cpu/patch_index.cpp): small blocks and
# balls, one range per GEMM, so every skip is decided on its own bound; at the default
# shape most surviving ranges are gathered and computed anyway, which hides a loose bound.
FINE = "8x16x1"


def use_prune_shape(monkeypatch, shape):
    if shape is not None:
        monkeypatch.setenv("FASTGEN_PRUNE", shape)


def free_port():
    """A TCP port free on 127.0.0.1 now (for a spawned gloo group's rendezvous)."""
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_gloo(rank, port, world=2):
    """A spawned test worker joins a gloo group on 127.0.0.1:port (dynamo imported first:
    fastgen.distributed.import_dynamo_first)."""
    from fastgen.distributed import init_tcp
    init_tcp(rank, world, port)
