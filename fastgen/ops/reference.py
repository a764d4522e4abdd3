"""Pure-PyTorch versions of every op.

`knn_exact` is the ground truth the tests compare against: float64, distances as
sum((q - k)^2) (no cancellation), ties to the lowest index. The others are what a
user would write without fastgen, used as the `torch` backend and as benchmark
providers. All of them work in chunks of query rows, so the peak is one
(chunk, M) block, never the N x M matrix in one piece.
"""
import torch


def _chunk_rows(n_keys, dim, budget_bytes, elem_bytes):
    # rows per chunk so that a (rows, M, D) difference tensor stays within budget
    return max(1, int(budget_bytes // max(1, n_keys * dim * elem_bytes)))


def _as_batched(queries, keys):
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
    queries, keys, squeeze = _as_batched(queries, keys)
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


def centering_shift(keys):
    """A shift to subtract from queries and keys (M, D) -> (1, D) before the expansion.

    Distances do not change under a shift, but the cancellation in
    ||q||^2 + ||k||^2 - 2 q.k shrinks with the norms, so data far from the origin
    ranks as well as centred data. The keys' mean is rounded to a power-of-two grid
    at the data's scale: integer-valued data stays integer-valued after the shift, so
    its arithmetic stays exact and exact ties stay ties (lowest index wins).
    """
    k = keys.float()
    mu = k.mean(0, keepdim=True)
    spread = float((k - mu).abs().max()) if k.numel() else 0.0
    if spread == 0.0 or not torch.isfinite(mu).all():
        return mu
    step = 2.0 ** max(-126, int(torch.tensor(spread).log2().floor().item()))
    return torch.round(mu / step) * step


def gather_sqdist(queries, keys, idx):
    """sum((q_i - k_idx[i, j])^2) in float32 for (B, N, D), (B, M, D), (B, N, k); differentiable."""
    B, N, k = idx.shape
    gathered = torch.gather(keys.unsqueeze(1).expand(B, N, *keys.shape[1:]), 2,
                            idx.unsqueeze(-1).expand(B, N, k, keys.shape[-1]))
    return (queries.unsqueeze(2).float() - gathered.float()).square().sum(-1)


def knn_addmm(queries, keys, k=1, exclude_self=False, chunk=256, stable_ties=False):
    """What a user writes without fastgen: ||q||^2 + ||k||^2 - 2 q.k by chunked addmm, then topk.

    float32, approximate near ties; the returned distances are recomputed directly so
    what a user reads is accurate. Shapes (N, D) or (B, N, D). `stable_ties` replaces
    topk by a stable sort so equal distances go to the lowest index (the `torch`
    backend's contract; slower, so benchmarks use plain topk).
    """
    queries, keys, squeeze = _as_batched(queries, keys)
    B, N, _ = queries.shape
    out_i = torch.empty(B, N, k, dtype=torch.long, device=queries.device)
    for b in range(B):
        mu = centering_shift(keys[b])  # see DESIGN.md on cancellation
        kb = keys[b].float() - mu
        kn = kb.square().sum(1)
        for s in range(0, N, chunk):
            q = queries[b, s:s + chunk].float() - mu
            d = torch.addmm(kn.unsqueeze(0), q, kb.t(), alpha=-2.0)  # (chunk, M), the cross term
            if exclude_self:
                rows = torch.arange(q.shape[0], device=d.device)
                d[rows, rows + s] = float("inf")
            if k == 1:
                out_i[b, s:s + chunk, 0] = d.argmin(1)  # first occurrence on ties
            elif stable_ties:
                out_i[b, s:s + chunk] = torch.sort(d, dim=1, stable=True).indices[:, :k]
            else:
                out_i[b, s:s + chunk] = d.topk(k, dim=1, largest=False, sorted=True).indices
    with torch.no_grad():
        dist = gather_sqdist(queries, keys, out_i)
    # topk's order among near-equal values is not the exact one: sort by the direct distance
    dist, order = torch.sort(dist, dim=-1, stable=True)
    out_i = torch.gather(out_i, -1, order)
    if squeeze:
        return dist[0], out_i[0]
    return dist, out_i


def knn_cdist(queries, keys, k=1, chunk=4096):
    """torch.cdist + topk in row chunks: the other common pure-PyTorch way."""
    queries, keys, squeeze = _as_batched(queries, keys)
    B, N, _ = queries.shape
    out_d = torch.empty(B, N, k, device=queries.device)
    out_i = torch.empty(B, N, k, dtype=torch.long, device=queries.device)
    for b in range(B):
        for s in range(0, N, chunk):
            d = torch.cdist(queries[b, s:s + chunk].float(), keys[b].float()).square_()
            v, i = d.topk(k, dim=1, largest=False, sorted=True)
            out_d[b, s:s + chunk], out_i[b, s:s + chunk] = v, i
    if squeeze:
        return out_d[0], out_i[0]
    return out_d, out_i


def nearest_code_exact(x, codebook):
    """Ground truth VQ lookup: (idx, dist) float64."""
    d, i = knn_exact(x, codebook, 1)
    return i[:, 0], d[:, 0]


def reparameterize_reference(mu, logvar, eps, logvar_min=None, logvar_max=None):
    """The unfused PyTorch expression a VAE usually writes (the `torch` backend), and with
    float64 inputs the ground truth: z = mu + exp(logvar/2)*eps, kl (B,) = 0.5*sum over
    non-batch dims of mu^2 + exp(logvar) - logvar - 1. logvar is clamped to
    [logvar_min, logvar_max] first when either is given. Half inputs are computed in
    float32; z has mu's dtype, kl is float32 (float64 for float64 inputs)."""
    acc = torch.float64 if mu.dtype == torch.float64 else torch.float32
    m, lv, e = mu.to(acc), logvar.to(acc), eps.to(acc)
    if logvar_min is not None or logvar_max is not None:
        lv = lv.clamp(logvar_min, logvar_max)
    z = m + torch.exp(0.5 * lv) * e
    kl = 0.5 * (m.square() + lv.exp() - lv - 1).reshape(m.shape[0], -1).sum(1)
    return z.to(mu.dtype), kl


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


def patch_nn_two_pass(queries, keys, alpha, chunk=256):
    """The public low-memory GPNN method: two chunked passes of addmm in fp32.

    Pass 1 takes the column minimum chunk by chunk, pass 2 the normalised argmin.
    (N, D) x (M, D) -> idx (N,). Used as the `torch` backend and as the benchmark peer.
    """
    q = queries.float()
    k = keys.float()
    mu = centering_shift(k)
    q, k = q - mu, k - mu
    qn = q.square().sum(1)
    kn = k.square().sum(1)
    n = q.shape[0]
    if alpha is None:
        weights = None
    else:
        colmin = torch.full((k.shape[0],), float("inf"), device=k.device)
        for s in range(0, n, chunk):
            d = torch.addmm(kn.unsqueeze(0), q[s:s + chunk], k.t(), alpha=-2.0)
            d += qn[s:s + chunk, None]
            colmin = torch.minimum(colmin, d.min(0).values)
        weights = 1.0 / (alpha + colmin.clamp_min(0))
    idx = torch.empty(n, dtype=torch.long, device=q.device)
    for s in range(0, n, chunk):
        d = torch.addmm(kn.unsqueeze(0), q[s:s + chunk], k.t(), alpha=-2.0)
        if weights is not None:
            d = (d + qn[s:s + chunk, None]).clamp_min_(0) * weights
        idx[s:s + chunk] = d.argmin(1)
    return idx


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
