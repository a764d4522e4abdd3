"""Exact kNN when every key sits inside the best one's fp32 error window.

    python benchmarks/bench_knn_near_identical.py              # both cases, 3 repeats
    python benchmarks/bench_knn_near_identical.py --repeats 5

Two cases users hit on their first step:
- an untrained IMLE generator's samples: 3,600 images of 64 x 64 x 3 that differ from one
  base image by per-pixel noise of std 0.017, searched by 1,800 data images (k = 1);
- a fresh `VectorQuantizer(65536, 128)` (codebook std ~1e-5, every code about the same
  distance from every input): one forward + backward on 8,192 vectors, beside K = 4,096.

Those rows go from the fp32 certified pass to a float64 GEMM screen and an exact re-rank
(`build_info()["dense_rows"]` counts them). Printed: medians of `--repeats` calls, the same
search by `torch.cdist(...).argmin` (fp32, not exact) and faiss IndexFlatL2 when installed,
and how often their answers agree with fastgen's exact one.
"""
import argparse
import statistics
import time

import torch

import fastgen
from fastgen.nn import VectorQuantizer
from fastgen.ops import knn


def _median(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def untrained_generator(repeats):
    g = torch.Generator().manual_seed(0)
    base = torch.rand(64 * 64 * 3, generator=g)
    keys = (base + 0.017 * torch.randn(3600, base.numel(), generator=g)).clamp(0, 1)
    q = torch.rand(1800, base.numel(), generator=g)
    before = fastgen._ext.build_info()["dense_rows"]
    t, (_, idx) = _median(lambda: knn(q, keys, 1), repeats)
    dense = (fastgen._ext.build_info()["dense_rows"] - before) // repeats
    tc, ref = _median(lambda: torch.cdist(q, keys).argmin(1), repeats)
    print(f"untrained generator 1800 x 3600 x 12288, k=1: knn {t:.2f} s "
          f"({dense} of 1800 rows dense), cdist+argmin {tc:.2f} s "
          f"(agrees on {(ref == idx[:, 0]).float().mean():.4f})")
    try:
        import faiss
    except ImportError:
        return
    index = faiss.IndexFlatL2(keys.shape[1])
    index.add(keys.numpy())
    tf, (_, fi) = _median(lambda: index.search(q.numpy(), 1), repeats)
    print(f"  faiss IndexFlatL2 {tf:.2f} s (agrees on "
          f"{(torch.from_numpy(fi[:, 0]) == idx[:, 0]).float().mean():.4f})")


def fresh_codebook(repeats):
    for k in (4096, 65536):
        torch.manual_seed(0)
        vq = VectorQuantizer(k, 128)
        x = torch.randn(8192, 128, requires_grad=True)

        def step():
            out = vq(x)
            (out.quantized.square().mean() + sum(out.losses.values())).backward()

        before = fastgen._ext.build_info()["dense_rows"]
        t, _ = _median(step, repeats)
        dense = (fastgen._ext.build_info()["dense_rows"] - before) // repeats
        print(f"VectorQuantizer({k}, 128) fwd+bwd on 8192 x 128: {t:.2f} s ({dense} rows dense)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    untrained_generator(a.repeats)
    fresh_codebook(a.repeats)


if __name__ == "__main__":
    main()
