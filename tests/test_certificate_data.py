"""Data that stresses knn's certificate (issue 13): one key of huge norm used to widen
every row's candidate window until each row fell back to the full exact scan; near-
duplicate image patches made bf16 slower than fp32 (every row re-ranked hundreds of keys).
"""
import warnings

import numpy as np
import pytest
import torch

import fastgen
from fastgen.ops import knn
import importlib
knn_module = importlib.import_module("fastgen.ops.knn_plan")   # where knn plans (bf16 included)
from fastgen.ops.reference import knn_exact


def overflow_rows():
    return fastgen.info()["backends"]["cpp"]["build"]["overflow_rows"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_one_outlier_key_costs_only_its_own_rows(precision):
    q, keys = torch.randn(300, 32), torch.randn(20000, 32)
    keys[1234] *= 2000.0                              # norm ~1e4, the outlier
    before = overflow_rows()
    got = knn(q, keys, 10, prune=False, precision=precision)
    assert overflow_rows() == before                  # no row fell back to the full scan
    ref_d, ref_i = knn_exact(q, keys, 10)
    assert torch.equal(got.idx, ref_i.reshape(got.idx.shape))
    # and the outlier is found where it is the answer
    far = keys[1234:1235] * 1.0001
    assert int(knn(far, keys, 1, precision=precision).idx) == 1234


def patches(name, p=6, stride=3):
    from sklearn.datasets import load_sample_image
    img = torch.from_numpy(np.array(load_sample_image(name))).float().div(255).permute(2, 0, 1)
    u = img.unfold(1, p, stride).unfold(2, p, stride)
    return u.permute(1, 2, 0, 3, 4).reshape(-1, 3 * p * p).contiguous()


def test_bf16_on_near_duplicate_patches_runs_fp32_and_says_so(monkeypatch):
    monkeypatch.setattr(knn_module, "_BF16_WARNED", set())
    q, keys = patches("flower.jpg"), patches("china.jpg")
    with pytest.warns(UserWarning, match="runs fp32 instead"):
        got = knn(q, keys, 5, precision="bf16", prune=False)
    assert torch.equal(got.idx, knn(q, keys, 5, precision="fp32", prune=False).idx)


def test_bf16_is_kept_where_it_pays(monkeypatch):
    monkeypatch.setattr(knn_module, "_BF16_WARNED", set())
    q, keys = torch.randn(4096, 128), torch.randn(16384, 128)
    assert knn_module.bf16_pays(q, keys, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        knn(q[:512], keys, 5, precision="bf16", prune=False)


def test_bf16_is_not_used_where_the_gemm_is_too_shallow(monkeypatch):
    monkeypatch.setattr(knn_module, "_BF16_WARNED", set())
    q, keys = torch.randn(4096, 64), torch.randn(16384, 64)
    with pytest.warns(UserWarning, match="too shallow"):
        assert not knn_module.bf16_pays(q, keys, 5)


def test_streaming_decides_bf16_once(monkeypatch):
    """StreamingKNN samples once for bf16, not once per query block and chunk."""
    from fastgen.ops import StreamingKNN
    calls = []
    real = knn_module._bf16_window                      # run by every real (sampled) decision
    monkeypatch.setattr(knn_module, "_bf16_window", lambda *a: calls.append(1) or real(*a))
    q, keys = torch.randn(9000, 128), torch.randn(12000, 128)
    s = StreamingKNN(q, 2, precision="bf16", prune=False)
    for c in keys.split(4000):
        s.add(c)
    assert len(calls) == 1             # one sampled decision, not one per query block and chunk
    assert torch.equal(s.result().idx, knn(q, keys, 2, prune=False).idx)
