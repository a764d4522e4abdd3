"""VectorQuantizer with 2^12 ... 2^18 codes: one forward + backward, time and peak memory,
beside vector-quantize-pytorch's VectorQuantize on the same inputs.

    python benchmarks/vq_scale.py                          # N = 65,536 tokens, D = 256
    python benchmarks/vq_scale.py --log2k 12,14 --n 16384

Each (provider, K) runs in a fresh process (`--one`): build the layer (defaults of each
package, fresh codebook), one warm-up forward + backward on other data, then one timed
forward + backward of sum(quantized) + the layer's losses; the peak resident memory above
the process's baseline (VmHWM) is read after it. The peer computes an N x K distance
matrix (and its softmax-free argmin and gradients over it), 4 N K bytes each: where three
of them would pass --peer-limit-gb it is not run and its need is printed instead.
"""
import argparse
import json
import sys
import time

import torch

from fastgen.benchmarking import RESULT_TAG, run_child


def _one(provider, log2k, n, d, ema=False):
    from fastgen.benchmarking import peak_kb, release_free_heap, reset_peak_kb
    k = 1 << log2k
    torch.manual_seed(0)
    if provider == "fastgen":
        from fastgen.nn import VectorQuantizer
        layer = VectorQuantizer(k, d, ema=ema, dead_code_threshold=2 if ema else None)

        def step(x):
            out = layer(x)
            (out.quantized.sum() + sum(out.losses.values())).backward()
    else:
        from vector_quantize_pytorch import VectorQuantize
        layer = VectorQuantize(dim=d, codebook_size=k)

        def step(x):
            q, _, loss = layer(x)
            (q.sum() + loss.sum()).backward()
    layer.train()
    step(torch.randn(1024, d, requires_grad=True))          # warm-up (lazy init, allocator)
    x = torch.randn(n, d, requires_grad=True)
    release_free_heap()
    base, method = reset_peak_kb()
    t = time.perf_counter()
    step(x)
    seconds = time.perf_counter() - t
    return {"provider": provider, "log2k": log2k, "n": n, "d": d, "seconds": seconds,
            "peak_mb": (peak_kb(method) - base) / 1024}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--log2k", default="12,14,16,18")
    ap.add_argument("--n", type=int, default=65536)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--peer-limit-gb", type=float, default=16.0)
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--ema", action="store_true",
                    help="fastgen's layer with EMA codes and dead-code reset (its statistics at scale)")
    ap.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True, help="also run the peer")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)   # provider:log2k (child process)
    a = ap.parse_args(argv)
    if a.one:
        provider, log2k = a.one.split(":")
        print(RESULT_TAG + json.dumps(_one(provider, int(log2k), a.n, a.d, a.ema)))
        return 0
    from fastgen.benchmarking import machine_line
    print(machine_line())
    print(f"N = {a.n} tokens, D = {a.d}; one forward + backward; fresh process per cell"
          f"{'; fastgen with EMA codes and dead-code reset' if a.ema else ''}\n")
    print("| codes | fastgen s | fastgen peak MB | vector-quantize-pytorch s | its peak MB | peer / fastgen time |")
    print("|--:|--:|--:|--:|--:|--:|")
    for log2k in [int(v) for v in a.log2k.split(",")]:
        cells = {}
        for provider in ("fastgen", "peer"):
            need_gb = 3 * 4 * a.n * (1 << log2k) / 2 ** 30
            if provider == "peer" and not a.peer:
                cells[provider] = "not run (--no-peer)"
                continue
            if provider == "peer" and need_gb > a.peer_limit_gb:
                cells[provider] = f"not run: its N x K matrices need ~{need_gb:.0f} GB"
                continue
            cmd = [sys.executable, __file__, "--one", f"{provider}:{log2k}", "--n", str(a.n), "--d", str(a.d)] + \
                (["--ema"] if a.ema else [])
            cells[provider] = run_child(cmd, a.timeout)   # a dict, or why there is none
        f, p = cells["fastgen"], cells["peer"]
        fs = f"{f['seconds']:.2f} | {f['peak_mb']:.0f}" if isinstance(f, dict) else f"{f} | -"
        ps = f"{p['seconds']:.2f} | {p['peak_mb']:.0f}" if isinstance(p, dict) else f"{p} | -"
        ratio = f"{p['seconds'] / f['seconds']:.2f}" if isinstance(f, dict) and isinstance(p, dict) else "-"
        print(f"| 2^{log2k} | {fs} | {ps} | {ratio} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
