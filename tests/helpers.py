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
