"""precision / recall / density / coverage at scale: one call, its time and peak memory.

    python benchmarks/prdc_scale.py                      # 50,000 x 50,000 x 2048, k = 5
    python benchmarks/prdc_scale.py --n 20000 --d 512

Inputs as in benchmarks/bench_prdc.py (correlated Gaussian features; fake = real's law
scaled by 1.1 and shifted by 0.05). One call of
fastgen.metrics.precision_recall_density_coverage (fp32 cross term): seconds and the
peak resident memory above the process's baseline (VmHWM). The `prdc` package holds
three float distance matrices (N^2 + M^2 + N M entries) and argpartitions them; its
need is printed from that count, and it is run only where it fits (--run-prdc).
"""
import argparse
import time

import torch

from bench_prdc import inputs  # noqa: E402 (benchmarks/, next to this script)
from fastgen.benchmarking import machine_line, peak_kb, release_free_heap, reset_peak_kb
from fastgen.metrics import precision_recall_density_coverage


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50_000, help="real and fake rows each")
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--run-prdc", action="store_true", help="also run the prdc package (needs the memory below)")
    a = ap.parse_args(argv)
    p = {"N": a.n, "M": a.n, "D": a.d, "k": a.k}
    real, fake = inputs(p)
    print(machine_line())
    held = 2 * a.n * a.d * 4 / 2 ** 20
    print(f"real, fake: {a.n} x {a.d} each ({held:.0f} MB together), k = {a.k}")
    release_free_heap()
    base, method = reset_peak_kb()
    t = time.perf_counter()
    out = precision_recall_density_coverage(real, fake, a.k)
    seconds = time.perf_counter() - t
    peak = (peak_kb(method) - base) / 1024
    flops = 2 * a.d * 4 * a.n * a.n
    print(f"fastgen: {seconds:.1f} s ({flops / seconds / 1e9:.0f} GFLOP/s over the four sweeps), "
          f"peak +{peak:.0f} MB above the inputs ({method}); "
          + ", ".join(f"{k} {v:.4f}" for k, v in out.items()))
    need = 4 * 3 * a.n * a.n / 2 ** 30
    print(f"prdc package: three {a.n} x {a.n} float32 distance matrices = {need:.1f} GiB "
          "before its argpartition copies")
    if a.run_prdc:
        import contextlib
        import io

        from prdc import compute_prdc
        release_free_heap()
        base, method = reset_peak_kb()
        t = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            ref = compute_prdc(real.numpy(), fake.numpy(), nearest_k=a.k)
        print(f"prdc: {time.perf_counter() - t:.1f} s, peak +{(peak_kb(method) - base) / 1024:.0f} MB; "
              + ", ".join(f"{k} {float(v):.4f}" for k, v in ref.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
