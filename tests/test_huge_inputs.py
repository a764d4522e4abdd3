"""Huge finite inputs (issue 13): every backend applies the C++ engine's rule -- a
squared norm that overflows float32 after centring is a ValueError naming the argument
-- instead of returning inf distances and index 0 (torch, triton before the fix)."""
import pytest
import torch

from conftest import backends
from fastgen.ops import knn, nearest_code, patch_nn


def huge(n, d, row, value):
    t = torch.randn(n, d)
    t[row] = value
    return t


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("value", [1e19, 1e30, -3e20])
@pytest.mark.parametrize("where", ["queries", "keys"])
def test_knn_refuses_overflowing_inputs(backend, value, where):
    q, k = torch.randn(40, 6), torch.randn(50, 6)
    if where == "queries":
        q = huge(40, 6, 7, value)
    else:
        k = huge(50, 6, 11, value)
    with pytest.raises(ValueError, match=f"{where} has values too large"):
        knn(q, k, 3, backend=backend)


@pytest.mark.parametrize("backend", backends())
def test_nearest_code_and_patch_nn_refuse_overflowing_inputs(backend):
    with pytest.raises(ValueError, match="codebook has values too large"):
        nearest_code(torch.randn(20, 4), huge(9, 4, 2, 1e25), backend=backend)
    with pytest.raises(ValueError, match="keys has values too large"):
        patch_nn(torch.rand(30, 12), huge(40, 12, 5, 1e21), 0.01, backend=backend)
    with pytest.raises(ValueError, match="queries has values too large"):
        patch_nn(huge(30, 12, 5, 1e21), torch.rand(40, 12), None, backend=backend)


@pytest.mark.parametrize("backend", backends())
def test_large_but_safe_values_still_rank_exactly(backend):
    """The rule is about overflow, not size: data offset far from the origin (centred
    away) and values up to ~1e17 still get the right neighbours."""
    q, k = torch.randn(30, 5) * 1e17, torch.randn(60, 5) * 1e17
    ref = ((q.double()[:, None] - k.double()[None]) ** 2).sum(-1).argmin(1)
    assert torch.equal(knn(q, k, 1, backend=backend).idx[:, 0], ref)


def test_pruned_keys_are_named_keys():
    """The pruned patch_nn used to blame "x" (its k-means' argument) for bad keys."""
    with pytest.raises(ValueError, match="^keys has values too large"):
        patch_nn(torch.rand(30, 12), huge(40, 12, 5, 1e21), 0.01, backend="cpp", prune=True)
