"""pytest-benchmark suite for knn: every provider x shape x k on the same seeded inputs.

    pytest benchmarks/bench_knn.py -k quick                 # small shapes only
    pytest benchmarks/bench_knn.py -k "quick and faiss"
    pytest benchmarks/bench_knn.py                          # everything (long on a small CPU)
    pytest benchmarks/bench_knn.py -k quick --benchmark-disable   # one call each, a smoke test

Timings here are in-process (pytest-benchmark's statistics); peak memory per
provider needs a fresh process per run and is measured by `benchmarks/report.py`
/ `fastgen bench` instead.
"""
import functools

import pytest
import torch

from fastgen import benchmarking as B

# id prefix "quick" / "large" so `-k quick` selects the small shapes; the large ones
# are also marked slow (a marker registered in pyproject.toml).
SHAPES = ([pytest.param(s, id="quick-{}x{}x{}".format(*s)) for s in B.QUICK_SHAPES]
          + [pytest.param(s, id="large-{}x{}x{}".format(*s), marks=pytest.mark.slow) for s in B.DEFAULT_SHAPES])
ROUNDS = {"quick": 5, "large": 3}


@functools.lru_cache(maxsize=1)
def _inputs(shape):
    return B.make_inputs(*shape)


@pytest.mark.parametrize("k", B.DEFAULT_K, ids=lambda k: f"k{k}")
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("provider", list(B.PROVIDERS))
def test_knn(benchmark, provider, shape, k):
    why = B.provider_unavailable(provider)
    if why:
        pytest.skip(why)
    N, M, D = shape
    queries, keys = _inputs(shape)
    # indices vs fastgen-cpp on the first queries that are not near-tied; warns only
    check = B.check_against_cpp(queries, keys, k, [provider])[provider]
    fn = B.PROVIDERS[provider](queries, keys, k)
    benchmark.group = f"knn {N}x{M}x{D} k={k}"
    benchmark.extra_info.update({"op": "knn", "N": N, "M": M, "D": D, "k": k, "provider": provider,
                                 "flops": B.knn_flops(N, M, D), "check": check,
                                 "threads": torch.get_num_threads()})
    rounds = ROUNDS["quick" if shape in B.QUICK_SHAPES else "large"]
    with torch.no_grad():
        dist, idx = benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)
    assert idx.shape == (N, k) and dist.shape == (N, k)
