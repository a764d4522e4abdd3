"""fastgen.ops.knn_plan: one planner, the same choice through every entry point."""
import warnings

import pytest
import torch

from conftest import backends
from fastgen.ops import StreamingKNN, knn, knn_plan
import importlib

knn_module = importlib.import_module("fastgen.ops.knn")


def plans_through_knn(monkeypatch, q, keys, k, **kw):
    seen = []
    real = knn_module.run_knn
    monkeypatch.setattr(knn_module, "run_knn", lambda *a: seen.append(a[-1]) or real(*a))
    out = knn(q, keys, k, **kw)
    # the first plan is the call's own (the pruned path's clustering calls knn again)
    assert seen
    return seen[0], out


def plan_of_stream(q, keys, k, **kw):
    s = StreamingKNN(q, k, **kw)
    for chunk in keys.split(4096):
        s.add(chunk)
    return s.plan, s.result()


CASES = [  # (name, queries, keys, k, request, the precision that runs)
    ("sweep", (300, 24), (2000, 24), 3, {}, "fp32"),
    ("pruned", (300, 24), (2000, 24), 3, {"prune": True}, "fp32"),
    ("bf16 kept", (2000, 128), (3000, 128), 2, {"precision": "bf16"}, "bf16"),
    ("bf16 refused (shallow)", (3000, 64), (20000, 64), 2, {"precision": "bf16"}, "fp32"),
    ("bf16 refused (near-duplicates)", "patches", None, 5, {"precision": "bf16"}, "fp32"),
]


def _patches(name, count):
    import numpy as np
    from sklearn.datasets import load_sample_image
    img = torch.from_numpy(np.array(load_sample_image(name))).float().div(255).permute(2, 0, 1)
    x = img.unfold(1, 6, 3).unfold(2, 6, 3).permute(1, 2, 0, 3, 4).reshape(-1, 108)
    return x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:count]].contiguous()


def _data(case):
    name, qs, ks, k, request, _ = case
    torch.manual_seed(2)
    if qs == "patches":   # 6x6x3 patches of flower.jpg against china.jpg's
        return _patches("flower.jpg", 4000), _patches("china.jpg", 8000), k, request
    return torch.randn(*qs), torch.randn(*ks), k, request


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_knn_and_streaming_knn_run_the_same_plan(monkeypatch, case):
    q, keys, k, request = _data(case)
    monkeypatch.setattr(knn_plan, "_BF16_WARNED", set())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        direct = knn_plan.plan_knn(q, keys, k, **request)
        via_knn, out = plans_through_knn(monkeypatch, q, keys, k, **request)
        via_stream, streamed = plan_of_stream(q, keys, k, **request)
    assert via_knn == direct
    assert direct.precision == case[-1]
    # the stream plans once, on its first chunk (4,096 keys), as a stream (it prunes only
    # when asked): the planner's answer for that chunk, and the same precision as knn's
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        chunk_plan = knn_plan.plan_knn(q, keys[:4096], k, streamed=True, **request)
    assert via_stream == chunk_plan, (via_stream, chunk_plan)
    assert via_stream.precision == direct.precision and via_stream.backend == direct.backend
    assert via_stream.prune == bool(request.get("prune"))
    assert torch.equal(streamed.idx, out.idx)


def test_the_plan_names_what_runs():
    q, keys = torch.randn(50, 8), torch.randn(400, 8)
    assert knn_plan.plan_knn(q, keys, 2) == knn_plan.KnnPlan("cpp", False, "fp32", "certified-sweep")
    assert knn_plan.plan_knn(q, keys, 2, prune=True).kernel == "pruned"
    assert knn_plan.plan_knn(q, keys, 2, backend="torch") == knn_plan.KnnPlan("torch", False, "fp32", "addmm")
    if "triton" in backends():
        assert knn_plan.plan_knn(q, keys, 2, backend="triton").kernel == "screened"
        assert knn_plan.plan_knn(q, keys, knn_plan.SCREEN_MAX_K + 1, backend="triton").kernel == "fp32-tiles"
        assert knn_plan.plan_knn(q, keys, knn_plan.SCREEN_MAX_K + 1, backend="triton",
                                 precision="bf16").kernel == "screened"


@pytest.mark.parametrize("bad,match", [
    ({"prune": True, "backend": "torch"}, "prune=True needs"),
    ({"prune": True, "exclude_self": True}, "prune=True needs"),
    ({"precision": "fp16"}, "precision"),
    ({"precision": "bf16", "backend": "torch"}, "precision='bf16' runs on"),
    ({"backend": "gpu"}, "backend must be one of"),
    ({"prune": "yes"}, "prune"),
])
def test_impossible_requests_are_refused_by_the_planner(bad, match):
    q = torch.randn(30, 4)
    kind = TypeError if bad.get("prune") == "yes" else ValueError
    with pytest.raises(kind, match=match):
        knn_plan.plan_knn(q, q, 2, **bad)
    with pytest.raises(kind, match=match):
        knn(q, q, 2, **bad)


def test_streaming_plans_once(monkeypatch):
    calls = []
    real = knn_plan.plan_knn
    monkeypatch.setattr(importlib.import_module("fastgen.ops.streaming_knn"), "plan_knn",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, keys = torch.randn(100, 6), torch.randn(3000, 6)
    s = StreamingKNN(q, 4)
    s.add(keys[:2])            # fewer keys than k: planned again on the next chunk
    for chunk in keys[2:].split(500):
        s.add(chunk)
    assert len(calls) == 2
    assert torch.equal(s.result().idx, knn(q, keys, 4).idx)


def test_streaming_bf16_is_not_decided_on_a_chunk_too_small_to_sample():
    q = torch.randn(50, 8)
    s = StreamingKNN(q, 2, precision="bf16")
    s.add(torch.randn(3, 8))            # k + 1 keys: bf16 kept as asked, not yet judged
    assert s.plan is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s.add(torch.randn(400, 8))
    assert s.plan is not None


def test_patch_index_without_alpha_plans_through_knn(monkeypatch):
    """PatchIndex's plain nearest-neighbour searches go through knn's planner."""
    from fastgen.ops import PatchIndex
    torch.manual_seed(3)
    q, keys = torch.randn(300, 24), torch.randn(2000, 24)
    seen = []
    real = knn_module.run_knn
    monkeypatch.setattr(knn_module, "run_knn", lambda *a: seen.append(a[-1]) or real(*a))
    idx = PatchIndex(keys, alpha=None).search(q)
    assert seen == [knn_plan.plan_knn(q, keys, 1)]
    assert torch.equal(idx, knn(q, keys, 1, prune=False).idx[:, 0])


@pytest.mark.parametrize("case", [c for c in CASES if c[1] != "patches" and "prune" not in c[4]],
                         ids=[c[0] for c in CASES if c[1] != "patches" and "prune" not in c[4]])
def test_nearest_code_runs_the_precision_the_planner_picks(monkeypatch, case):
    """nearest_code asks the same planner: where bf16 does not pay, its cpp op runs fp32."""
    from fastgen.ops import nearest_code
    q, keys, _, request = _data(case)
    ran = []
    real = torch.ops.fastgen.nearest_code
    monkeypatch.setattr(torch.ops.fastgen, "nearest_code", lambda x, c, p: ran.append(p) or real(x, c, p))
    monkeypatch.setattr(knn_plan, "_BF16_WARNED", set())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = knn_plan.plan_knn(q, keys, 1, prune=False, **request).precision
        got = nearest_code(q, keys, **request)
    assert ran == [want]
    assert torch.equal(got.idx, knn(q, keys, 1).idx[:, 0])
