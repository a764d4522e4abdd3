"""The float64 ground truth of every op, what the tests compare against: distances as
sum((q - k)^2) computed directly (no cancellation), ties to the lowest index. Test sizes
(some build the N x M matrix). What users write without fastgen in float32 -- the
`torch` backend and the benchmark peers -- is fastgen/ops/baselines.py.
"""
import torch


def _chunk_rows(n_keys, dim, budget_bytes, elem_bytes):
    # rows per chunk so that a (rows, M, D) difference tensor stays within budget
    return max(1, int(budget_bytes // max(1, n_keys * dim * elem_bytes)))


def as_batched(queries, keys):
    """(N, D) pairs as a batch of one: (queries, keys, squeezed)."""
    squeeze = queries.dim() == 2
    if squeeze:
        queries, keys = queries.unsqueeze(0), keys.unsqueeze(0)
    return queries, keys, squeeze


def sqdist_exact(queries, keys):
    """(N, D) x (M, D) -> (N, M) float64 squared distances, computed directly. Test sizes only."""
    diff = queries.double()[:, None, :] - keys.double()[None, :, :]
    return diff.square().sum(-1)


def knn_exact(queries, keys, k=1, exclude_self=False, budget_bytes=64 << 20):
    """Ground truth: float64 (dist, idx), ascending, ties to the lowest index."""
    queries, keys, squeeze = as_batched(queries, keys)
    B, N, D = queries.shape
    M = keys.shape[1]
    out_d = torch.empty(B, N, k, dtype=torch.float64)
    out_i = torch.empty(B, N, k, dtype=torch.long)
    step = _chunk_rows(M, D, budget_bytes, 8)
    for b in range(B):
        kb = keys[b].double()
        for s in range(0, N, step):
            q = queries[b, s:s + step].double()
            d = (q[:, None, :] - kb[None, :, :]).square().sum(-1)
            if exclude_self:
                rows = torch.arange(q.shape[0])
                d[rows, rows + s] = float("inf")
            # stable sort: equal distances keep index order -> lowest index first
            dv, di = torch.sort(d, dim=1, stable=True)
            out_d[b, s:s + step] = dv[:, :k]
            out_i[b, s:s + step] = di[:, :k]
    if squeeze:
        return out_d[0], out_i[0]
    return out_d, out_i


def nearest_code_exact(x, codebook):
    """Ground truth VQ lookup: (idx, dist) float64."""
    d, i = knn_exact(x, codebook, 1)
    return i[:, 0], d[:, 0]


def vector_quantize_reference(x, codebook, commitment=0.25):
    """The textbook VQ layer step on rows x (N, D): the full (N, K) distance matrix
    (float64, computed directly), argmin, an (N, K) one-hot, one-hot @ codebook.
    Returns (z_q straight-through, idx, commitment loss (weighted), codebook loss, one_hot).
    Test sizes only: it is everything fastgen.nn.VectorQuantizer avoids."""
    import torch.nn.functional as F
    idx = sqdist_exact(x.detach(), codebook.detach()).argmin(1)   # first occurrence on ties
    one_hot = F.one_hot(idx, codebook.shape[0]).to(codebook.dtype)
    q = one_hot @ codebook
    commit = commitment * F.mse_loss(x, q.detach())
    codebook_loss = F.mse_loss(q, x.detach())
    return x + (q - x).detach(), idx, commit, codebook_loss, one_hot


def vq_ema_update_reference(x, one_hot, cluster_size, embed_sum, decay=0.99, eps=1e-5):
    """One EMA codebook step (van den Oord 2017, appendix) from a one-hot (N, K) in float64:
    returns (cluster_size, embed_sum, codebook) after the step, Laplace-smoothed counts."""
    x, one_hot = x.double(), one_hot.double()
    cluster_size = cluster_size.double() * decay + (1 - decay) * one_hot.sum(0)
    embed_sum = embed_sum.double() * decay + (1 - decay) * (one_hot.t() @ x)
    n = cluster_size.sum()
    smoothed = (cluster_size + eps) / (n + cluster_size.shape[0] * eps) * n
    return cluster_size, embed_sum, embed_sum / smoothed[:, None]


def patch_nn_exact(queries, keys, alpha):
    """Ground truth for patch_nn on small inputs: float64, direct distances.

    Returns (idx (N,), scores (N, M), best (N,)): the optimum, the whole score matrix
    and the optimum score per query, so tests judge a backend's choice by the score
    it reaches (natural patches are full of near-ties).
    """
    d = sqdist_exact(queries, keys)  # (N, M) float64: test sizes only
    if alpha is None:
        s = d
    else:
        s = d / (alpha + d.min(0, keepdim=True).values)
    best, idx = s.min(1)
    return idx, s, best


def fold_patches_reference(source, idx, patch):
    """unfold -> gather -> fold / count: the straightforward way, with the (N, C*p*p) matrix."""
    B, C, Hs, Ws = source.shape
    Hq, Wq = idx.shape[1:]
    cols = torch.nn.functional.unfold(source.double(), patch)  # (B, C*p*p, Ls)
    chosen = torch.gather(cols, 2, idx.reshape(B, 1, -1).expand(B, cols.shape[1], Hq * Wq))
    size = (Hq + patch - 1, Wq + patch - 1)
    total = torch.nn.functional.fold(chosen, size, patch)
    count = torch.nn.functional.fold(torch.ones_like(chosen), size, patch)
    return total / count


def reparameterize_reference(mu, logvar, eps, logvar_min=None, logvar_max=None):
    """z = mu + exp(logvar/2)*eps and kl (B,) = 0.5*sum over non-batch dims of
    mu^2 + exp(logvar) - logvar - 1 in float64 (logvar clamped to [logvar_min,
    logvar_max] first when either is given): the unfused expression on float64 copies,
    written here so that the ground truth depends on no fp32 code."""
    m, lv, e = mu.double(), logvar.double(), eps.double()
    if logvar_min is not None or logvar_max is not None:
        lv = lv.clamp(logvar_min, logvar_max)
    z = m + torch.exp(0.5 * lv) * e
    kl = 0.5 * (m.square() + lv.exp() - lv - 1).reshape(m.shape[0], -1).sum(1)
    return z, kl


def ball_count_exact(points, centres, radii, budget_bytes=64 << 20):
    """Ground truth of ball_count: per point, #{j: fl32(d_j) <= radii_j} with d_j the float64
    squared distance to centre j, and the nearest centre (float64 dist, lowest index on ties)."""
    n, m, dim = points.shape[0], centres.shape[0], centres.shape[1]
    count = torch.empty(n, dtype=torch.long)
    near_d = torch.empty(n, dtype=torch.float64)
    near_i = torch.empty(n, dtype=torch.long)
    c64 = centres.double().cpu()
    r = radii.float().cpu()
    step = _chunk_rows(m, dim, budget_bytes, 8)
    for s in range(0, n, step):
        d = (points[s:s + step].double().cpu()[:, None, :] - c64[None]).square().sum(-1)
        count[s:s + step] = (d.float() <= r[None]).sum(1)
        near_d[s:s + step], near_i[s:s + step] = d.min(1)    # min returns the first index on ties
    return count, near_d, near_i
