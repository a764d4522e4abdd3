"""fastgen.ops.ball_count: per point, how many balls contain it, and its nearest centre --
the core of precision / recall / density / coverage (fastgen.metrics.prdc), exact, with
no N x M distance matrix."""
from typing import NamedTuple

import torch

from fastgen import _ext
from fastgen.ops import _backend, _validate, reference
from fastgen.ops.knn import knn


class BallCounts(NamedTuple):
    """ball_count's result."""
    count: torch.Tensor  # (N,) int64: balls j with ||p - c_j||^2 <= radii_j
    dist: torch.Tensor   # (N,) float32 squared distance to the nearest centre
    idx: torch.Tensor    # (N,) int64 index of the nearest centre (lowest on ties)


def ball_count(points, centres, radii, *, backend="auto", precision="fp32"):
    """How many balls (centres[j], radius^2 = radii[j]) contain each point, and its nearest centre.

    Exact like `knn`: a point is inside ball j when its squared distance, computed in
    float64 from the inputs and rounded to float32, is <= radii[j] (a point on the
    boundary is inside). The C++ and Triton kernels decide every pair on a fast fp32 (or,
    with precision="bf16", bf16-input) distance unless it lies within a proven error
    window of the radius; those few pairs are recomputed in float64
    (csrc/engine/ball_count.h). Memory: O(N + M) beyond the inputs.

    Args:
        points: (N, D) float32/float16/bfloat16.
        centres: (M, D), same dtype and device, M >= 1.
        radii: (M,) squared radii, float32 (other float dtypes are cast), finite, >= 0 --
            e.g. `knn(centres, centres, k + 1)[0][:, k]` (the k-th neighbour, self excluded).
        backend: "auto" (cpp on CPU, triton on CUDA), "cpp", "triton" or "torch" (the
            float64 reference in row chunks: exact and slow).
        precision: "fp32" or "bf16" (cpp only), as in knn.

    Returns:
        BallCounts(count, dist, idx). The nearest centre is knn's k = 1 answer (the
        Triton backend ranks it in fp32 like knn's Triton kernel).
    """
    _validate.points(points, "points", ndims=(2,))
    _validate.points(centres, "centres", ndims=(2,))
    _validate.same_kind(points, "points", centres, "centres")
    if centres.shape[0] == 0:
        raise ValueError("centres is empty (0 balls)")
    if not isinstance(radii, torch.Tensor):
        raise TypeError(f"radii must be a torch.Tensor, got {type(radii).__name__}")
    if radii.dim() != 1 or radii.shape[0] != centres.shape[0]:
        raise ValueError(f"radii must be a 1-D tensor of M={centres.shape[0]} squared radii (one per centre), "
                         f"got shape {tuple(radii.shape)}")
    if not radii.is_floating_point():
        raise TypeError(f"radii must be a float tensor of squared radii, got {radii.dtype}")
    if radii.device != centres.device:
        raise ValueError(f"radii is on {radii.device} but centres is on {centres.device}")
    radii = radii.float()
    _validate.precision(precision)
    be = _backend.resolve(backend, points.device, precision, bf16_backends=("cpp",))
    if be != "cpp":  # the C++ op checks the same (radii too) inside its first pass over the data
        _validate.distance_inputs(points, "points", centres, "centres")
        if radii.numel() and not bool((torch.isfinite(radii) & (radii >= 0)).all()):
            raise ValueError("radii must be finite and >= 0 (squared radii); got NaN, inf or negative values")
    if be == "cpp":
        return BallCounts(*torch.ops.fastgen.ball_count(points.contiguous(), centres.contiguous(),
                                                        radii.contiguous(), precision))
    if be == "torch":
        count, dist, idx = reference.ball_count_exact(points, centres, radii)
        dev = points.device
        return BallCounts(count.to(dev), dist.float().to(dev), idx.to(dev))
    return _ball_count_triton(points, centres, radii)


def _ball_count_triton(points, centres, radii):
    from fastgen.ops.triton.ball_count import ball_count_triton   # optional dependency: triton
    p, c = points.contiguous(), centres.contiguous()
    count, unsure = ball_count_triton(p, c, radii.contiguous())
    count = count.long()
    redo = torch.nonzero(unsure > 0).flatten()
    if redo.numel():   # the rows with pairs inside the error window: decided in float64
        count[redo] = reference.ball_count_exact(p[redo], c, radii)[0].to(count.device)
    dist, idx = knn(p, c, 1, backend="triton")
    return BallCounts(count, dist[:, 0].detach(), idx[:, 0])


if _ext.CPP_AVAILABLE:
    @torch.library.register_fake("fastgen::ball_count")
    def _ball_count_fake(points, centres, radii, precision):
        _validate.fake_point_sets(points.unsqueeze(0), centres.unsqueeze(0), "points", "centres")
        _validate.one_device(centres=centres, radii=radii)
        _validate.precision(precision)
        if centres.shape[0] == 0:
            raise ValueError("centres is empty (0 balls)")
        if radii.dim() != 1 or radii.shape[0] != centres.shape[0] or radii.dtype != torch.float32:
            raise ValueError(f"radii must be a 1-D float32 tensor of {centres.shape[0]} entries")
        n = points.shape[0]
        return (points.new_empty((n,), dtype=torch.long), points.new_empty((n,), dtype=torch.float32),
                points.new_empty((n,), dtype=torch.long))
