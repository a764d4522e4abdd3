"""knn_data: knn on data that stresses its certificate -- one key of huge norm, and
near-duplicate natural-image patches -- next to the clean case.

    pytest benchmarks/bench_knn_data.py --benchmark-only --benchmark-json=d.json

Cases: data=clean (standard-normal queries 5000 x 64 and keys 50000 x 64, k=10),
data=outlier (the same with key 1234 scaled to norm ~1e4: before the per-key error
bound every row fell back to the full exact scan, 0.6 s -> 15-18 s), data=patches
(6x6x3 patches of flower.jpg (queries) vs china.jpg (keys), stride 2, ~67k x 67k, k=5:
where bf16's error window holds hundreds of near-duplicate keys per row).
Providers: fastgen-cpp (fp32, full certified sweep, prune=False), fastgen-cpp-bf16
(precision="bf16", prune=False: knn decides by a 64-query sample whether bf16 pays and
runs fp32 otherwise), faiss (IndexFlatL2). Guard: indices equal fastgen's exact fp32
answer on the first 256 queries, ties at 1e-4 relative excluded.
"""
import numpy as np
import torch

from fastgen.benchmarking import Provider, Suite, cases, faiss_flat, knn_verdict

CHECK_QUERIES = 256


def patches(name, p=6, stride=2):
    from sklearn.datasets import load_sample_image
    img = torch.from_numpy(np.array(load_sample_image(name))).float().div(255).permute(2, 0, 1)
    u = img.unfold(1, p, stride).unfold(2, p, stride)
    return u.permute(1, 2, 0, 3, 4).reshape(-1, 3 * p * p).contiguous()


def inputs(p):
    if p["data"] == "patches":
        return patches("flower.jpg"), patches("china.jpg")
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(5000, 64, generator=g), torch.randn(50000, 64, generator=g)
    if p["data"] == "outlier":
        k[1234] *= 1250.0
    return q, k


def _fastgen(precision):
    def make(x, p, mode):
        from fastgen.ops import knn
        return lambda: knn(x[0], x[1], p["k"], precision=precision, prune=False)
    return make


def _faiss(x, p, mode):
    return lambda: faiss_flat(x[0], x[1], p["k"])


def check(p, x, mode, provider, out):
    return knn_verdict(x[0], x[1], out[1], p["k"], CHECK_QUERIES)


def _work(p, mode):
    q, k = SUITE.build_inputs(next(c for c in SUITE.cases if c.p == p))
    return {"flops": 2.0 * q.shape[0] * k.shape[0] * q.shape[1]}


SUITE = Suite(
    op="knn_data",
    cases=cases(quick=[dict(data="clean", k=10), dict(data="outlier", k=10)],
                large=[dict(data="patches", k=5)]),
    providers={"fastgen-cpp": Provider(_fastgen("fp32"), needs_cpp=True),
               "fastgen-cpp-bf16": Provider(_fastgen("bf16"), needs_cpp=True),
               "faiss": Provider(_faiss, requires=("faiss",))},
    inputs=inputs, check=check, work=_work, baselines=("faiss", "fastgen-cpp"), file=__file__,
)

test_knn_data = SUITE.pytest_test()
