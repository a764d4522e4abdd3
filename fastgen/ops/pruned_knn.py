"""Exact k nearest neighbours that skip the keys the triangle inequality rules out: the
policy around the C++ pass (csrc/engine/pruned_passes.h, `pruned_topk`).

Data with structure (image patches, clustered features) has most of its keys far from
any given query's neighbourhood. The keys are grouped into balls (k-means clusters of
~cluster_size keys, split past 1,024, members sorted by their distance rho_j to the
centre c: fastgen.ops.key_clusters.cluster_keys), and for a query q every key of a ball
obeys

    ||q - k_j|| >= | ||q - c|| - rho_j |

so with an upper bound U_i of query i's k-th distance, only keys with rho_j within
sqrt(U_i) of ||q_i - c|| can be among its k nearest. The pass is GPNN's (the same
engine, balls and traversal as patch_nn's pruned passes, torch.classes.fastgen.PatchIndex):
queries sorted by nearest ball, blocks of 32, balls visited by increasing bound, each
row screening the gathered keys against its own threshold.

Exactness: every fp32 value is within a proven window of the true distance, U_i is the
k-th smallest upper bound seen, candidates within the window are re-ranked in float64
from the inputs with ties to the lowest index; a skipped key is provably farther than
U_i. So the answer is the certified sweep's, bit for bit. Rows whose window holds a
large share of the keys (near-duplicates) are answered by the sweep's dense path.

When it pays: the index is built per call, so it needs many queries per key, and the
bounds need structure (patches of natural images, clustered features, not random
Gaussians). knn(prune=None) prunes by fastgen.ops.knn_plan.prune_pays, tuned on half of
benchmarks/bench_knn_zoo.py (auto, sweep, pruned and faiss on every case).
"""
import math
from dataclasses import dataclass

import torch

from fastgen.ops import _validate, baselines
from fastgen.ops.key_clusters import cluster_keys
from fastgen.ops.knn_plan import KnnPlan, structure_ratio  # noqa: F401 (structure_ratio: also imported from here)
from fastgen.ops.knn_sweep import run_sweep
from fastgen.ops.unit_scale import unit_scale
from fastgen.threads import fine_grained_threads


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


def key_index(keys, cluster_size=128, precision="fp32", check=True):
    """(M, D) keys clustered and prepared once for pruned searches (the C++ PatchIndex).

    The index is built per knn call, so it is cheap: ~128 keys per ball around random
    keys, one assignment and no Lloyd step (the clustering decides only how much is
    skipped, never the answer). Measured on the 70 cases of benchmarks/bench_knn_zoo.py: a
    Lloyd step makes the build 1.43x longer (median) for 7 % fewer pairs, a net loss on
    63 of them; 64 keys per ball builds 1.5x slower and searches no faster."""
    sorted_keys, offsets, order = cluster_keys(keys, cluster_size, iterations=0, check=check)
    return torch.classes.fastgen.PatchIndex(sorted_keys, offsets, order, precision)


def _sweep(queries, keys, k, precision):
    """The certified C++ sweep (the pruned path is cpp-only), no autograd."""
    with torch.no_grad():
        return tuple(run_sweep(queries, keys, k, False, KnnPlan("cpp", False, precision, "certified-sweep")))


def pruned_knn(queries, keys, k=1, *, bound=None, index=None, cluster_size=128, precision="fp32", checked=False):
    """knn(queries, keys, k) for (N, D) x (M, D) on the CPU, skipping provably farther keys.

    bound: optional (N,) upper bounds of what matters per query (squared distances):
        keys farther than bound[i] may be skipped even if fewer than k remain, and the
        row is then padded with (inf, -1). StreamingKNN passes its running k-th best.
    index: key_index(keys) built already (for several query sets against one key set);
        built here when None. With an index the data is searched as it is: it must be
        near unit scale (the bounds are fp32 squares; without one, data far from it is
        moved there first).

    checked: the inputs passed the distance-input rule already (knn checks them): not
        checked again.

    Returns ((dist, idx), pairs computed)."""
    # (short passes: one thread while other processes hold cores, as the search below)
    with fine_grained_threads():
        if not checked:
            _validate.distance_inputs(queries, "queries", keys, "keys")
        scale = unit_scale(queries, keys) if index is None else 1.0
    if index is None:
        if scale is None:
            # scaling would round some coordinates (subnormal): the sweep is exact at any scale
            return _sweep(queries, keys, k, precision), queries.shape[0] * keys.shape[0]
        if scale != 1.0:
            # the bounds are fp32 squares: far from unit scale they underflow to 0 (every
            # key ruled out) or overflow; a power of two moves the data to unit scale
            # exactly, so the same keys win, and distances scale back exactly
            b = None if bound is None else (bound.double() / scale ** 2).float()
            (d, i), computed = pruned_knn(queries / scale, keys / scale, k, bound=b,
                                          cluster_size=cluster_size, precision=precision, checked=True)
            if scale < 1.0:
                # tiny data: scaling the fp32 distances back would round twice where they
                # are subnormal; recomputed from the inputs in float64, they round once, as
                # the sweep's do
                d = baselines.candidate_sqdist64(queries, keys, i).to(d.dtype)
            else:
                d = (d.double() * scale ** 2).to(d.dtype)
            return (d, i), computed
    # short GEMMs and per-block bound work: one thread while other processes hold cores
    with fine_grained_threads():
        return _pruned(queries, keys, k, bound, index, cluster_size, precision)


def _pruned(queries, keys, k, bound, index, cluster_size, precision):
    n, m = queries.shape[0], keys.shape[0]
    if n == 0:
        return (torch.empty(0, k), torch.empty(0, k, dtype=torch.long)), 0
    if index is None:
        index = key_index(keys, cluster_size, precision, check=False)
    before = index.pairs()[1]
    b = None if bound is None else bound.float().contiguous()
    dist, idx, deferred = index.knn(queries.contiguous(), k, b)
    computed = index.pairs()[1] - before
    rows = deferred.nonzero().flatten()
    if rows.numel():
        # near-duplicate keys: the sweep's float64 screen answers these rows
        d, i = _sweep(queries[rows], keys, k, precision)
        if b is not None:
            far = d > b[rows, None]
            d, i = d.masked_fill(far, math.inf), i.masked_fill(far, -1)
        dist[rows], idx[rows] = d, i
        computed += rows.numel() * m
    _COUNT.pairs_total += n * m
    _COUNT.pairs_computed += computed
    return (dist, idx), computed
