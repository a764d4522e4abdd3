"""The kNN sweep: every (query, key) pair computed, on the backend a plan names.

Below knn (which adds the pruned path and validation) and nearest_code, so both share
it without importing each other.
"""
from typing import NamedTuple

import torch

from fastgen.ops import baselines
from fastgen.ops.unit_scale import unit_scale


class Neighbours(NamedTuple):
    """knn's result: (dist, idx), as faiss and pytorch3d order them."""
    dist: torch.Tensor  # (..., N, k) float32 squared distances, ascending
    idx: torch.Tensor   # (..., N, k) int64 key indices


def run_sweep(queries, keys, k, exclude_self, plan):
    """knn by a sweep plan (fastgen.ops.knn_plan, plan.prune False) on validated inputs."""
    squeeze = queries.dim() == 2
    q3 = queries.unsqueeze(0) if squeeze else queries
    k3 = keys.unsqueeze(0) if squeeze else keys
    if plan.backend == "cpp":
        dist, idx = torch.ops.fastgen.knn(q3.contiguous(), k3.contiguous(), k, exclude_self, plan.precision)
    else:
        screened = plan.kernel == "screened"   # re-ranked in float64 (exact)
        # Far from unit scale fp32 squares underflow (1e-25 data: every distance 0, every
        # key a tie) or overflow: search data moved to unit scale by a power of two
        # (exact, the same keys win). The C++ engine does the same inside.
        scale = unit_scale(q3, k3)
        sq, sk = (q3, k3) if scale in (None, 1.0) else (q3 / scale, k3 / scale)
        if screened:
            from fastgen.ops.certified import knn_screened   # optional dependency: triton
            with torch.no_grad():        # the gradient comes from gather_sqdist below
                dist, idx = knn_screened(sq, sk, k, exclude_self, fp32=plan.precision == "fp32")
        elif plan.backend == "triton":                       # larger k: ranked in fp32
            from fastgen.ops.triton.knn import knn_triton      # optional dependency: triton
            dist, idx = knn_triton(sq, sk, k, exclude_self)
        else:
            dist, idx = baselines.knn_addmm(sq, sk, k, exclude_self, stable_ties=True)
        if sq is not q3:
            # distances of the inputs themselves, in float64 and rounded once
            with torch.no_grad():
                dist = torch.stack([baselines.candidate_sqdist64(q3[b], k3[b], idx[b])
                                    for b in range(idx.shape[0])]).float()
        if torch.is_grad_enabled() and (queries.requires_grad or keys.requires_grad):
            g = baselines.gather_sqdist(q3, k3, idx)
            # the screens' values are fl32 of the float64 distances, in order: keep them
            # (g - g is exactly 0) and take the gradient of sum((q - k)^2)
            dist = dist + (g - g.detach()) if screened else g
    if squeeze:
        return Neighbours(dist[0], idx[0])
    return Neighbours(dist, idx)
