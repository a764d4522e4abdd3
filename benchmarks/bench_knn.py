"""knn: fastgen's exact kNN against what users pick instead (faiss, chunked torch).

    pytest benchmarks/bench_knn.py --benchmark-only -k quick --benchmark-json=knn.json

Inputs: standard-normal float32 queries (N, D) and keys (M, D), seeded, the same for
every provider. Providers: fastgen-cpp (fp32 cross term) and fastgen-cpp-bf16 (bf16
cross term, still exact: re-ranked in float64), torch-addmm (||q||^2 + ||k||^2 - 2 q.k
by chunked addmm, then topk), torch-cdist (chunked cdist + topk), faiss (IndexFlatL2,
the index built inside the timed call: IMLE redraws its samples every search, and the
copy faiss makes of the keys is part of its memory). Guard: indices equal fastgen's
exact ones on the first 256 queries whose k+1 nearest distances are not within 1e-4
(relative) of each other. Work: 2*N*M*D flops (the cross term).
"""
import torch

from fastgen.benchmarking import Provider, Suite, cases

CHECK_QUERIES = 256


def inputs(p):
    g = torch.Generator().manual_seed(0)
    return torch.randn(p["N"], p["D"], generator=g), torch.randn(p["M"], p["D"], generator=g)


def _fastgen(precision):
    def make(x, p, mode):
        from fastgen.ops import knn
        return lambda: knn(x[0], x[1], p["k"], backend="cpp", precision=precision)
    return make


def _torch(fn_name):
    def make(x, p, mode):
        from fastgen.ops import baselines
        fn = getattr(baselines, fn_name)
        return lambda: fn(x[0], x[1], p["k"])
    return make


def _faiss(x, p, mode):
    import faiss
    import numpy as np
    faiss.omp_set_num_threads(torch.get_num_threads())
    q, kb = x[0].numpy(), x[1].numpy()   # zero-copy views of the same fp32 inputs

    def run():
        index = faiss.IndexFlatL2(kb.shape[1])
        index.add(kb)
        dist, idx = index.search(q, p["k"])
        return torch.from_numpy(dist), torch.from_numpy(idx.astype(np.int64, copy=False))
    return run


def check(p, x, mode, provider, out):
    """Indices vs fastgen's exact answer on the first queries that are not near-tied."""
    from fastgen.ops import knn
    k = p["k"]
    q, keys = x[0][:CHECK_QUERIES], x[1]
    kk = min(k + 1, keys.shape[0])
    with torch.no_grad():
        ref_d, ref_i = knn(q, keys, kk, backend="cpp")
    ref_d = ref_d.double()
    tied = ((ref_d[:, 1:] - ref_d[:, :-1]) <= 1e-4 * ref_d[:, 1:].abs().clamp_min(1e-12)).any(1) if kk > 1 \
        else torch.zeros(q.shape[0], dtype=torch.bool)
    idx = out[1][:CHECK_QUERIES].long()
    bad = (idx[:, :k] != ref_i[:, :k]).any(1) & ~tied
    return "ok" if not bad.any() else f"{int(bad.sum())} of {int((~tied).sum())} untied queries differ"


SUITE = Suite(
    op="knn",
    cases=cases(quick=[dict(N=4096, M=1024, D=64, k=k) for k in (1, 10)]
                + [dict(N=4096, M=4096, D=147, k=k) for k in (1, 10)],
                # VQ-sized, IMLE-sized, metrics-sized, one GPNN level (122x122 image)
                large=[dict(N=n, M=m, D=d, k=k) for n, m, d in [(16384, 1024, 64), (65536, 8192, 256),
                                                                (10000, 100000, 512), (14884, 14884, 147)]
                       for k in (1, 10)]),
    providers={"fastgen-cpp": Provider(_fastgen("fp32"), needs_cpp=True),
               "fastgen-cpp-bf16": Provider(_fastgen("bf16"), needs_cpp=True),
               "torch-addmm": Provider(_torch("knn_addmm")),
               "torch-cdist": Provider(_torch("knn_cdist")),
               "faiss": Provider(_faiss, requires=("faiss",))},
    inputs=inputs, check=check,
    work=lambda p, mode: {"flops": 2.0 * p["N"] * p["M"] * p["D"]},
    baselines=("faiss", "torch-addmm"),
    file=__file__,
)

test_knn = SUITE.pytest_test()
