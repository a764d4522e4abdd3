"""pruned_knn: exact kNN on data with structure -- 8x8x3 patches of sklearn's china.jpg
(queries) against those of flower.jpg (keys), D=192 -- where the pruned search skips
what the triangle inequality rules out.

    pytest benchmarks/bench_pruned_knn.py --benchmark-only -k quick --benchmark-json=p.json

Inputs: patches at stride 4 (quick, 16,695 x 16,695) or 2 (large, 66,570 x 66,570),
values in [0, 1]. Providers: fastgen (knn with its default prune=None: knn_plan.prune_pays decides, the
clustering of the keys is inside the timed call), fastgen-sweep
(knn prune=False, the full certified sweep), faiss (IndexFlatL2, built in the call).
Guard: indices equal fastgen's full sweep on the first 512 queries (ties at 1e-4
relative excluded); fastgen's row also reports the fraction of the N*M distances its
pruned search computed. Work: 2*N*M*D (the full sweep's).
"""
import torch

from fastgen.benchmarking import Provider, Suite, cases, faiss_flat, knn_verdict

CHECK_QUERIES = 512
_LAST = {}


def patches(name, stride, p=8):
    import numpy as np
    from sklearn.datasets import load_sample_image
    img = torch.from_numpy(np.array(load_sample_image(name))).float().div(255).permute(2, 0, 1)
    u = img.unfold(1, p, stride).unfold(2, p, stride)            # (C, H', W', p, p)
    return u.permute(1, 2, 0, 3, 4).reshape(-1, 3 * p * p).contiguous()


def inputs(p):
    return patches("china.jpg", p["stride"]), patches("flower.jpg", p["stride"])


def _fastgen(prune):
    def make(x, p, mode):
        from fastgen.ops import knn
        from fastgen.ops.pruned_knn import prune_count

        def run():
            before = prune_count()
            out = knn(x[0], x[1], p["k"], prune=prune)
            after = prune_count()
            _LAST["fraction"] = ((after.pairs_computed - before.pairs_computed)
                                 / max(1, after.pairs_total - before.pairs_total))
            return out
        return run
    return make


def _faiss(x, p, mode):
    return lambda: faiss_flat(x[0], x[1], p["k"])


def check(p, x, mode, provider, out):
    verdict = knn_verdict(x[0], x[1], out[1], p["k"], CHECK_QUERIES)
    if verdict == "ok" and provider == "fastgen":
        return f"ok ({100 * _LAST.get('fraction', 1.0):.1f} % of pairs computed)"
    return verdict


SUITE = Suite(
    op="pruned_knn",
    cases=cases(quick=[dict(stride=4, k=k) for k in (1, 10)],
                large=[dict(stride=2, k=k) for k in (1, 10)]),
    providers={"fastgen": Provider(_fastgen(None), needs_cpp=True),
               "fastgen-sweep": Provider(_fastgen(False), needs_cpp=True),
               "faiss": Provider(_faiss, requires=("faiss",))},
    inputs=inputs, check=check,
    work=lambda p, mode: {"flops": 2.0 * 192 * (1 + 421 // p["stride"]) ** 2 * 4},   # replaced below
    baselines=("faiss", "fastgen-sweep"),
    file=__file__,
)


def _work(p, mode):
    q, k = SUITE.build_inputs(next(c for c in SUITE.cases if c.p == p))
    return {"flops": 2.0 * q.shape[0] * k.shape[0] * q.shape[1]}


SUITE.work = _work
test_pruned_knn = SUITE.pytest_test()
