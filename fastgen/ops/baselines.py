"""What users write without fastgen, in float32: the `torch` backend of every op and the
benchmarks' pure-PyTorch peers. They work in chunks of query rows, so the peak is one
(chunk, M) block, never the N x M matrix in one piece. The float64 ground truth the
tests compare against is fastgen/ops/reference.py.

Centring (see DESIGN.md on cancellation): every fp32 distance path of fastgen -- these,
the Triton kernels (triton/_tiles.py) and the C++ engine (csrc/cpu/operands.cpp) --
subtracts `centering_shift(keys)` from both sets before the expansion.
"""
import torch

from fastgen.ops.reference import as_batched


def centering_shift(keys):
    """The point every fp32 distance path of fastgen subtracts from queries and keys before
    the expansion: (M, D) -> (1, D), or (B, M, D) -> (B, D), float32.

    Distances do not change under a shift, but the cancellation in
    ||q||^2 + ||k||^2 - 2 q.k shrinks with the norms, so data far from the origin
    ranks as well as centred data. The keys' mean is rounded to a power-of-two grid
    at the data's scale (the largest |k - mean|): integer-valued data stays
    integer-valued after the shift, so its arithmetic stays exact and exact ties stay
    ties (lowest index wins). Tensor ops only (no host sync: traces under
    torch.compile); csrc/cpu/operands.cpp computes the same shift.
    """
    k3 = keys if keys.dim() == 3 else keys.unsqueeze(0)
    mu = k3.mean(1, dtype=torch.float32)
    spread = torch.maximum(k3.amax(1).float() - mu, mu - k3.amin(1).float()).amax(1, keepdim=True)
    step = torch.exp2(torch.floor(torch.log2(spread)).clamp_min(-126.0))
    snapped = torch.round(mu / step) * step
    keep = (spread == 0) | ~torch.isfinite(spread) | ~torch.isfinite(mu).all(1, keepdim=True)
    return torch.where(keep, mu, snapped).contiguous()


def gather_sqdist(queries, keys, idx):
    """sum((q_i - k_idx[i, j])^2) in float32 for (B, N, D), (B, M, D), (B, N, k); differentiable."""
    B, N, k = idx.shape
    gathered = torch.gather(keys.unsqueeze(1).expand(B, N, *keys.shape[1:]), 2,
                            idx.unsqueeze(-1).expand(B, N, k, keys.shape[-1]))
    return (queries.unsqueeze(2).float() - gathered.float()).square().sum(-1)


def candidate_sqdist64(queries, keys, idx, rows=1024):
    """float64 sum((q_i - keys[idx[i, j]])^2), (N, k), straight from the inputs: what the
    merges below rank by (float32 distances can tie where float64 ones do not). idx -1
    (no candidate) gives +inf. Row blocks: no float64 copy of all the queries."""
    out = torch.empty(idx.shape, dtype=torch.float64, device=idx.device)
    for s in range(0, idx.shape[0], rows):
        q = queries[s:s + rows].double()
        for j in range(idx.shape[1]):
            col = idx[s:s + rows, j]
            d = (q - keys[col.clamp_min(0)].double()).square().sum(1)
            out[s:s + rows, j] = d.masked_fill_(col < 0, float("inf"))
    return out


def knn_addmm(queries, keys, k=1, exclude_self=False, chunk=256, stable_ties=False):
    """What a user writes without fastgen: ||q||^2 + ||k||^2 - 2 q.k by chunked addmm, then topk.

    float32, approximate near ties; the returned distances are recomputed directly so
    what a user reads is accurate. Shapes (N, D) or (B, N, D). `stable_ties` replaces
    topk by a stable sort so equal distances go to the lowest index (the `torch`
    backend's contract; slower, so benchmarks use plain topk).
    """
    queries, keys, squeeze = as_batched(queries, keys)
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
    queries, keys, squeeze = as_batched(queries, keys)
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


def reparameterize_unfused(mu, logvar, eps, logvar_min=None, logvar_max=None):
    """The unfused PyTorch expression a VAE usually writes (the `torch` backend; with
    float64 inputs, reference.reparameterize_reference): z = mu + exp(logvar/2)*eps,
    kl (B,) = 0.5*sum over non-batch dims of mu^2 + exp(logvar) - logvar - 1 (the direct
    form, which cancels for small |logvar| in fp32). logvar is clamped to
    [logvar_min, logvar_max] first when either is given. Half inputs are computed in
    float32; z has mu's dtype, kl is float32 (float64 for float64 inputs)."""
    acc = torch.float64 if mu.dtype == torch.float64 else torch.float32
    m, lv, e = mu.to(acc), logvar.to(acc), eps.to(acc)
    if logvar_min is not None or logvar_max is not None:
        lv = lv.clamp(logvar_min, logvar_max)
    z = m + torch.exp(0.5 * lv) * e
    kl = 0.5 * (m.square() + lv.exp() - lv - 1).reshape(m.shape[0], -1).sum(1)
    return z.to(mu.dtype), kl
