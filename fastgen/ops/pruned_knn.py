"""Exact k nearest neighbours that skip the keys the triangle inequality rules out.

Data with structure (image patches, clustered features) has most of its keys far from
any given query's neighbourhood. The keys are grouped into balls (k-means, pieces of at
most 2 * cluster_size members sorted by their distance rho_j to the cluster centre c),
and for a query q every key of a piece obeys

    ||q - k_j|| >= | ||q - c|| - rho_j |

so with an upper bound t_i of query i's k-th distance, only keys with rho_j within
sqrt(t_i) of ||q_i - c|| can be among its k nearest: a contiguous range of each piece.
Queries are sorted by their nearest centre and searched in blocks:

    1. t_i: the exact k-th distance over the few pieces nearest to the block (or the
       caller's bound, e.g. StreamingKNN's running k-th best, whichever is smaller);
    2. per piece the union over the block's rows of the rho range they need; those keys,
       in ascending original index, go through the certified `knn` kernel together.

Exactness: every skipped key is provably farther than t_i >= the row's k-th distance
(rho from float64, ||q - c|| from an fp32 GEMM with a proven error window, every
interval widened outward), and the keys
that are searched are ranked by the same certified kernel as a full `knn` (float64
ranking, lowest original index on ties, since a block's keys keep their original order).
So the answer is the full search's, bit for bit.

When it pays: on this project's 2-core machines, never against the certified sweep
(benchmarks/bench_knn_zoo.py: 1.35-7.4x slower on every case of the zoo), so
`knn(prune=None)` sweeps and pruning runs only when asked (`prune=True`).
`structure_ratio` compares a sample of queries' k-th distance with their distance to
random keys (random Gaussians ~0.9, patches of natural images 0.01-0.5): how much a
pruning pass could skip.

Headroom (measured on china.jpg vs flower.jpg patches, k=1): the block union computes
~12 % of the pairs, the rows' own annuli would need ~1.3 %; a C++ pass that filters per
row (like csrc/engine/pruned_passes.h does for GPNN) is the next step.
"""
import math
from dataclasses import dataclass

import torch

from fastgen.ops import _validate, baselines
from fastgen.ops.unit_scale import unit_scale
from fastgen.threads import fine_grained_threads


_SLACK = 1e-5   # relative widening of every interval (float32 rounding of rho and of the bounds)


@dataclass
class PruneCount:
    """Distances computed by pruned searches, out of all (N x M) pairs."""
    pairs_total: int = 0
    pairs_computed: int = 0

    @property
    def fraction_computed(self):
        return self.pairs_computed / self.pairs_total if self.pairs_total else 0.0


_COUNT = PruneCount()


def prune_count():
    """Totals of every pruned knn since the process started (a copy)."""
    return PruneCount(_COUNT.pairs_total, _COUNT.pairs_computed)


@dataclass
class KeyBalls:
    """Keys grouped for pruning: pieces of consecutive sorted keys sharing a centre.

    Coordinates are shifted by `shift` (baselines.centering_shift, as every fp32 distance
    path): centre g is shift + centres[g] exactly (both fp32, summed in float64), and
    rho is the float64 distance of each key to that exact point (stored as float32)."""
    order: torch.Tensor      # (M,) sorted position -> original key index
    offsets: torch.Tensor    # (P + 1,) piece p = sorted positions [offsets[p], offsets[p+1])
    shift: torch.Tensor      # (1, D) float32
    centres: torch.Tensor    # (C, D) float32, shifted coordinates
    centre_sq: torch.Tensor    # (C,) float32 ||centres||^2 (rounded up)
    centre_norm: torch.Tensor  # (C,) float32 ||centres|| (rounded up)
    piece_cluster: torch.Tensor  # (P,) cluster of each piece
    rho: torch.Tensor        # (P, S) float32 member distances to the centre, ascending, +inf padding
    rho_lo: torch.Tensor     # (P,) smallest rho of the piece
    rho_hi: torch.Tensor     # (P,) largest

    @property
    def pieces(self):
        return self.offsets.numel() - 1


def key_balls(keys, cluster_size=64, iterations=1, seed=0):
    """KeyBalls of (M, D) keys: k-means clusters of ~cluster_size keys (their means,
    rounded to fp32, as centres), members by distance to the centre, cut into pieces of
    at most 2 * cluster_size. The clustering decides only how much is skipped."""
    from fastgen.ops.patch_index import cluster_keys
    _, offsets, order = cluster_keys(keys, cluster_size, iterations, seed)
    order = order.to(keys.device)
    sizes = offsets.diff()
    offsets = torch.cat([offsets[:1], offsets[1:][sizes > 0]])      # empty clusters dropped
    sizes = offsets.diff()
    c = sizes.numel()
    ball = torch.repeat_interleave(torch.arange(c), sizes).to(keys.device)
    shift = baselines.centering_shift(keys.float()).double()
    # float64 in row chunks: a float64 copy of all keys would be twice their fp32 size
    step = 8192
    centres = torch.zeros(c, keys.shape[1], dtype=torch.float64, device=keys.device)
    for s in range(0, order.numel(), step):
        centres.index_add_(0, ball[s:s + step], keys[order[s:s + step]].double() - shift)   # exact for fp32
    centres = centres.div_(sizes.to(keys.device, torch.float64)[:, None]).float()
    c64 = centres.double()
    rho = torch.cat([(keys[order[s:s + step]].double() - shift - c64[ball[s:s + step]]).norm(dim=1)
                     for s in range(0, order.numel(), step)])
    # clusters renumbered along a nearest-neighbour tour of their centres: queries sorted
    # by nearest cluster then form blocks of neighbouring clusters, which need the same keys
    tour = _centre_tour(centres)
    rank = torch.empty_like(tour)
    rank[tour] = torch.arange(c, device=tour.device)
    centres, sizes = centres[tour].contiguous(), sizes[tour.cpu()]
    ball = rank[ball]
    within = torch.argsort(rho, stable=True)
    within = within[torch.argsort(ball[within], stable=True)]    # by cluster, then by rho
    order, rho = order[within], rho[within]
    offsets = torch.cat([offsets[:1], torch.cumsum(sizes, 0)])
    # pieces: consecutive runs of at most `cap` members of one cluster
    cap = 2 * cluster_size
    per = (sizes + cap - 1) // cap
    piece_cluster = torch.repeat_interleave(torch.arange(c), per)
    first = offsets[:-1].repeat_interleave(per)
    rank = torch.arange(int(per.sum())) - torch.repeat_interleave(torch.cumsum(per, 0) - per, per)
    starts = first + rank * cap
    ends = torch.minimum(starts + cap, offsets[1:].repeat_interleave(per))
    p_off = torch.cat([starts, ends[-1:]])
    p_sizes = ends - starts
    npieces = p_sizes.numel()
    pos_piece = torch.repeat_interleave(torch.arange(npieces), p_sizes)
    pos_in = torch.arange(keys.shape[0]) - starts[pos_piece]
    pad = torch.full((npieces, cap), math.inf, dtype=torch.float64, device=keys.device)
    pad[pos_piece.to(keys.device), pos_in.to(keys.device)] = rho
    pad = pad.float()       # rounded to nearest: the searches widen by _SLACK, the ends by 1e-6
    hi = pad.masked_fill(pad.isinf(), -1).amax(1)
    return KeyBalls(order=order, offsets=p_off.to(keys.device), shift=shift.float(), centres=centres.contiguous(),
                    centre_sq=centres.double().square().sum(1).float(),
                    centre_norm=centres.double().norm(dim=1).mul(1 + 1e-6).float(), piece_cluster=piece_cluster.to(keys.device),
                    rho=pad, rho_lo=pad[:, 0] * (1 - 1e-6), rho_hi=hi * (1 + 1e-6))


def _centre_tour(centres):
    """A greedy nearest-neighbour tour of the (C, D) centres: an order in which
    consecutive centres are close. Past 4096 centres (one C x C matrix would be large)
    the k-means order is kept: still exact, with less locality."""
    c = centres.shape[0]
    if c <= 2 or c > 4096:
        return torch.arange(c, device=centres.device)
    d = torch.cdist(centres, centres)
    d.fill_diagonal_(math.inf)
    tour = [0]
    d[:, 0] = math.inf
    for _ in range(c - 1):
        nxt = int(d[tour[-1]].argmin())
        tour.append(nxt)
        d[:, nxt] = math.inf
    return torch.tensor(tour, device=centres.device)


def structure_ratio(queries, keys, k=1, sample=64, seed=0):
    """sqrt(k-th distance / median distance to a key) over a sample of queries: how far
    a query's neighbourhood is, relative to the data's scale. ~1 for uniform
    high-dimensional data (nothing to prune), well under 1/3 for structured data. Costs
    `sample` rows of the full search."""
    from fastgen.ops.knn import knn
    g = torch.Generator().manual_seed(seed)
    n, m = queries.shape[0], keys.shape[0]
    qs = queries[torch.randperm(n, generator=g)[:sample].to(queries.device)]
    near = knn(qs, keys, k, prune=False).dist[:, -1].double()
    ks = keys[torch.randint(m, (qs.shape[0],), generator=g).to(keys.device)]
    typical = (qs.double() - ks.double()).square().sum(1)
    return float((near.median() / typical.median().clamp_min(1e-300)).sqrt())


def _centre_ranges(balls, q):
    """[lo, hi] (float32, (rows, C)) holding the true ||q - c|| of shifted fp32 rows q
    to every cluster centre, from one fp32 GEMM: g = ||q||^2 + ||c||^2 - 2 q.c is within
    W = (D + 4) 2^-23 (||q|| + ||c||)^2 of the exact value (any summation order; twice
    the textbook gamma_{D+2}), and the shift's rounding moved q by at most 2^-23 ||q||.
    The float32 square roots and sums below add a few ulps, covered by 1e-5 relative."""
    qsq = q.square().sum(1, keepdim=True)
    g = torch.addmm(qsq + balls.centre_sq[None, :], q, balls.centres.T, alpha=-2.0)
    qn = qsq.sqrt()
    w = (qn + balls.centre_norm[None, :]).square_().mul_((q.shape[1] + 4) * 2.0 ** -23)
    e = qn * 2.0 ** -23
    lo = (g - w).clamp_min_(0).sqrt_().mul_(1 - 1e-5).sub_(e).clamp_min_(0)
    hi = (g + w).clamp_min_(0).sqrt_().mul_(1 + 1e-5).add_(e)
    return lo, hi


def _ranges_to_positions(starts, ends):
    """Concatenated arange(starts[i], ends[i]) for int64 tensors."""
    lens = (ends - starts).clamp_min(0)
    total = int(lens.sum())
    if total == 0:
        return starts.new_empty(0)
    base = torch.repeat_interleave(starts - torch.cumsum(lens, 0) + lens, lens)
    return base + torch.arange(total, device=starts.device)


def pruned_knn(queries, keys, k=1, *, bound=None, balls=None, block=None, cluster_size=64, precision="fp32"):
    """knn(queries, keys, k) for (N, D) x (M, D) on the CPU, skipping provably farther keys.

    bound: optional (N,) upper bounds of what matters per query (squared distances):
        keys farther than bound[i] may be skipped even if fewer than k remain, and the
        row is then padded with (inf, -1). StreamingKNN passes its running k-th best.
    balls: KeyBalls of `keys` from key_balls (built here when None).
    block: queries searched together (None: N / 64 within [128, 1024]; larger blocks
        cost less Python per row but share a wider union of keys).

    Returns (Neighbours, pairs computed)."""
    from fastgen.ops.knn import Neighbours, knn
    from fastgen.ops.nearest_code import nearest_code
    if balls is None:
        scale = unit_scale(queries, keys)
        if scale is None:
            # scaling would round some coordinates (subnormal): the sweep is exact at any scale
            out = knn(queries, keys, k, prune=False, precision=precision)
            return out, queries.shape[0] * keys.shape[0]
        if scale > 1.0:
            # huge data: refused as the sweep refuses it, not answered with inf distances
            _validate.distance_inputs(queries, "queries", keys, "keys")
        if scale != 1.0:
            # the bounds below are fp32 squares: far from unit scale they underflow to 0
            # (every key ruled out) or overflow; a power of two moves the data to unit
            # scale exactly, so the same keys win, and distances scale back exactly
            b = None if bound is None else (bound.double() / scale ** 2).float()
            (d, i), computed = pruned_knn(queries / scale, keys / scale, k, bound=b, block=block,
                                          cluster_size=cluster_size, precision=precision)
            if scale < 1.0:
                # tiny data: scaling the fp32 distances back would round twice where they
                # are subnormal; recomputed from the inputs in float64, they round once, as
                # the sweep's do
                d = baselines.candidate_sqdist64(queries, keys, i).to(d.dtype)
            else:
                d = (d.double() * scale ** 2).to(d.dtype)
            return Neighbours(d, i), computed
    # a loop of short kernels and torch ops: one thread while other processes hold cores
    with fine_grained_threads():
        return _pruned_blocks(queries, keys, k, bound, balls, block, cluster_size, precision)


def _pruned_blocks(queries, keys, k, bound, balls, block, cluster_size, precision):
    from fastgen.ops.knn import Neighbours, knn
    from fastgen.ops.nearest_code import nearest_code
    n, m = queries.shape[0], keys.shape[0]
    dist = torch.full((n, k), math.inf, device=queries.device)
    idx = torch.full((n, k), -1, dtype=torch.long, device=queries.device)
    if n == 0:
        return Neighbours(dist, idx), 0
    if balls is None:
        balls = key_balls(keys, cluster_size)
    if block is None:
        block = min(1024, max(128, n // 64))
    qs = (queries.float() - balls.shift).contiguous()
    # queries sorted by their nearest centre: a block's rows need the same few pieces
    # (sorting each cluster's rows by their distance to it too was measured: no gain)
    qorder = torch.argsort(nearest_code(qs, balls.centres).idx, stable=True)
    sizes = balls.offsets.diff()
    pc = balls.piece_cluster
    computed = 0
    for s in range(0, n, block):
        rows = qorder[s:s + block]
        q = queries[rows]
        clo, chi = _centre_ranges(balls, qs[rows])
        lo_q, hi_q = clo[:, pc], chi[:, pc]                                     # (b, P)
        gap = torch.maximum(balls.rho_lo[None] - hi_q, lo_q - balls.rho_hi[None]).clamp_min_(0)
        t = None if bound is None else bound[rows].float()
        if t is None or not bool(torch.isfinite(t).all()):
            # 1. a threshold from the pieces nearest to the block (enough keys for k)
            lead = torch.argsort(gap.amin(0))
            take = int(torch.searchsorted(torch.cumsum(sizes[lead], 0), max(k, 2 * cluster_size))) + 1
            first = torch.unique(torch.cat([lead[:take], gap.argmin(1)]))
            pos = _ranges_to_positions(balls.offsets[first], balls.offsets[first + 1])
            sub = torch.sort(balls.order[pos]).values
            kk = min(k, sub.numel())
            d1 = knn(q, keys[sub], kk, prune=False, precision=precision).dist
            computed += q.shape[0] * sub.numel()
            # knn's distances are float64-accurate, rounded to float32
            t1 = d1[:, -1] * (1 + 2.0 ** -20) if kk == k else torch.full((q.shape[0],), math.inf)
            t = t1 if t is None else torch.minimum(t, t1)
        # 2. per piece, the rho range some row still needs
        reach = (t.sqrt() * (1 + _SLACK))[:, None]
        need = gap <= reach
        lo = torch.where(need, lo_q - reach, math.inf).amin(0)
        hi = torch.where(need, hi_q + reach, -math.inf).amax(0)
        live = torch.nonzero(lo <= hi).flatten()
        if live.numel() == 0:
            continue
        widen = _SLACK * balls.rho_hi[live]
        a = torch.searchsorted(balls.rho[live], (lo[live] - widen)[:, None]).flatten()
        b = torch.searchsorted(balls.rho[live], (hi[live] + widen)[:, None], right=True).flatten()
        pos = _ranges_to_positions(balls.offsets[live] + a, balls.offsets[live] + torch.minimum(b, sizes[live]))
        if pos.numel() == 0:
            continue
        sub = torch.sort(balls.order[pos]).values
        kk = min(k, sub.numel())
        d, i = knn(q, keys[sub], kk, prune=False, precision=precision)
        computed += q.shape[0] * sub.numel()
        dist[rows, :kk] = d
        idx[rows, :kk] = sub[i]
    _COUNT.pairs_total += n * m
    _COUNT.pairs_computed += computed
    return Neighbours(dist, idx), computed
