"""streaming_knn: IMLE's search -- every query's nearest of many keys that arrive in
chunks -- against faiss holding them all.

    pytest benchmarks/bench_streaming_knn.py --benchmark-only -k quick --benchmark-json=s.json

Inputs: standard-normal float32 queries (N, D) (the data) and M keys (the samples) drawn
in chunks of 8,192 from per-chunk seeds, the same for every provider; every provider
draws the keys inside the timed call (IMLE redraws its samples every round).
Providers: fastgen-stream (StreamingKNN, chunk by chunk, fp32 cross term; pruning is
decided by its cheap measure and is off on this unstructured data), fastgen-stream-bf16
(bf16 cross term, still exact), faiss (IndexFlatL2 over all M keys: what a user without
streaming does; it holds every sample). Guard: indices equal fastgen's exact knn over
all keys on the first 256 queries (k=1 ties at 1e-4 relative excluded). Work: 2*N*M*D.
"""
import torch

from fastgen.benchmarking import Provider, Suite, cases, knn_verdict

CHUNK = 8192
CHECK_QUERIES = 256


def inputs(p):
    g = torch.Generator().manual_seed(0)
    return torch.randn(p["N"], p["D"], generator=g)


def key_chunks(p):
    for c, s in enumerate(range(0, p["M"], CHUNK)):
        g = torch.Generator().manual_seed(1000 + c)
        yield torch.randn(min(CHUNK, p["M"] - s), p["D"], generator=g)


def _stream(precision):
    def make(q, p, mode):
        from fastgen.ops import StreamingKNN

        def run():
            s = StreamingKNN(q, p["k"], precision=precision)
            for keys in key_chunks(p):
                s.add(keys)
            return s.result()
        return run
    return make


def _faiss(q, p, mode):
    import faiss
    import numpy as np
    faiss.omp_set_num_threads(torch.get_num_threads())

    def run():       # faiss holds every sample: each chunk is added as it is drawn
        index = faiss.IndexFlatL2(p["D"])
        for keys in key_chunks(p):
            index.add(keys.numpy())
        dist, idx = index.search(q.numpy(), p["k"])
        return torch.from_numpy(dist), torch.from_numpy(idx.astype(np.int64, copy=False))
    return run


def check(p, q, mode, provider, out):
    return knn_verdict(q, torch.cat(list(key_chunks(p))), out[1], p["k"], CHECK_QUERIES)


SUITE = Suite(
    op="streaming_knn",
    cases=cases(quick=[dict(N=2000, M=40000, D=64, k=1)],
                large=[dict(N=20000, M=200000, D=256, k=1)]),
    providers={"fastgen-stream": Provider(_stream("fp32"), needs_cpp=True),
               "fastgen-stream-bf16": Provider(_stream("bf16"), needs_cpp=True),
               "faiss": Provider(_faiss, requires=("faiss",))},
    inputs=inputs, check=check,
    work=lambda p, mode: {"flops": 2.0 * p["N"] * p["M"] * p["D"]},
    baselines=("faiss",),
    file=__file__,
)

test_streaming_knn = SUITE.pytest_test()
