"""k-means clusters of a key set: the balls of every pruned search (patch_nn's
PatchIndex, knn's pruned path)."""
import torch

from fastgen.ops import _validate
from fastgen.ops.nearest_code import nearest_code


def cluster_keys(keys, cluster_size=64, iterations=4, seed=0, check=True):
    """k-means (Lloyd, `iterations` steps, ~`cluster_size` keys per cluster) of (M, D) keys:
    (sorted_keys (M, D), offsets (C + 1,) int64, order (M,) int64) with cluster g =
    sorted_keys[offsets[g]:offsets[g+1]], members by distance to their centre, and order
    the original index of each sorted key.

    The clustering only decides how much a pruned search can skip, never its answer; a
    few Lloyd steps are enough (each costs ~1/cluster_size of one patch_nn pass).
    Deterministic for a given seed. check=False skips the distance-input rule for keys a
    caller has checked already (knn's pruned path: the check is a tenth of its build)."""
    _validate.points(keys, "keys", ndims=(2,))
    _validate.positive_int(cluster_size, "cluster_size")
    _validate.positive_int(iterations, "iterations", minimum=0)
    m = keys.shape[0]
    if m == 0:
        raise ValueError("keys is empty (0 patches)")
    if check:
        # the same rule as every distance op, named for the caller (nearest_code below
        # would blame its own argument, "x")
        _validate.distance_inputs(keys, "keys", keys, "keys")
    x = keys.float()
    c = -(-m // cluster_size)
    gen = torch.Generator().manual_seed(int(seed))
    centres = x[torch.randperm(m, generator=gen)[:c].to(keys.device)].clone()
    assign = torch.zeros(m, dtype=torch.long, device=keys.device)
    for step in range(iterations + 1):
        near = nearest_code(x, centres)
        assign = near.idx
        if step == iterations:
            break
        counts = torch.bincount(assign, minlength=c)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        filled = counts > 0                      # an empty cluster keeps its old centre
        centres[filled] = sums[filled] / counts[filled, None].to(x.dtype)
    # within a cluster by distance to its centre: the annulus bound then needs a
    # contiguous range of each cluster (ties broken by original index)
    # (the squared distance to the centre, from the search itself: recomputing it costs
    # an (M, D) temporary and a fifth of the build)
    rho = near.dist
    order = torch.argsort(rho, stable=True)
    order = order[torch.argsort(assign[order], stable=True)]
    counts = torch.bincount(assign, minlength=c)
    offsets = torch.zeros(c + 1, dtype=torch.long, device=keys.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return keys[order].contiguous(), offsets.cpu(), order.cpu()
