"""patch_nn (GPNN's normalised patch nearest neighbour) on real image patches, and
GPNN end to end.

    python benchmarks/bench_patch_nn.py                 # 256x256 crop -> 62.5k x 62.5k x 147
    python benchmarks/bench_patch_nn.py --size 128      # smaller
    python benchmarks/bench_patch_nn.py --e2e 128       # one GPNN sample of china.jpg at 128 px height

Providers, all on the same patches (keys = 7x7x3 patches of sklearn's china.jpg, queries
= the same patches plus noise, as at GPNN's coarsest level): fastgen-cpp (pruned: the
default, its k-means of the keys included in the time), fastgen-cpp-full (prune=False,
every tile), each with an fp32 or bf16 cross term, and torch-two-pass, the public low-memory method (chunks of 256 rows
through addmm, column minimum first, then the normalised argmin). Each provider runs in
a fresh process so its peak memory (RSS above the inputs) is its own. The floor: two
passes of 2*N*M*D flops each.
"""
import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PROVIDERS = ("fastgen-cpp", "fastgen-cpp-full", "fastgen-cpp-bf16", "fastgen-cpp-full-bf16", "torch-two-pass")


def patches(size):
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_sample_image
    img = torch.from_numpy(load_sample_image("china.jpg").copy()).permute(2, 0, 1).float()[None] / 255
    h, w = img.shape[-2:]
    side = min(h, w)
    img = img[..., (h - side) // 2:(h + side) // 2, (w - side) // 2:(w + side) // 2]  # square crop
    img = F.interpolate(img, size=(size, size), mode="area")
    keys = F.unfold(img, 7).transpose(1, 2)[0].contiguous()
    g = torch.Generator().manual_seed(0)
    queries = (keys + 0.05 * torch.randn(keys.shape, generator=g)).contiguous()
    return queries, keys


def child(provider, size, repeats):
    """Runs in a fresh process: build inputs, reset the peak-RSS mark, time, report."""
    import torch
    from fastgen.benchmarking import _peak_kb, _reset_peak_kb
    from fastgen.ops import patch_nn, reference
    queries, keys = patches(size)
    alpha = 0.005 * keys.shape[1]  # GPNN's 0.005 on mean squared differences, as sums
    if provider == "torch-two-pass":
        fn = lambda: reference.patch_nn_two_pass(queries, keys, alpha)  # noqa: E731
    else:
        prec = "bf16" if provider.endswith("bf16") else "fp32"
        prune = "-full" not in provider
        fn = lambda: patch_nn(queries, keys, alpha, backend="cpp", precision=prec, prune=prune)  # noqa: E731
    patch_nn(queries[:64], keys[:64], alpha)  # load code and thread pools before the baseline
    from fastgen.ops.patch_nn import prune_stats
    tiles0 = prune_stats()
    base, method = _reset_peak_kb()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        idx = fn()
        times.append(time.perf_counter() - t)
    peak = _peak_kb(method)
    tiles1 = prune_stats()
    times.sort()
    n, d = keys.shape
    from fastgen.benchmarking import RESULT_TAG
    print(RESULT_TAG + json.dumps({"provider": provider, "N": n, "M": n, "D": d, "median_s": times[len(times) // 2],
                      "min_s": times[0], "max_s": times[-1], "repeats": repeats,
                      "peak_mb": (peak - base) / 1024 if peak and base else None,
                      "threads": torch.get_num_threads(), "idx_sum": int(idx.sum()),
                      "computed_fraction": ((tiles1[1] - tiles0[1]) / (tiles1[0] - tiles0[0])
                                         if tiles1[0] > tiles0[0] else None)}))


def e2e(height, precision):
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_sample_image
    from fastgen.models import GPNN
    img = torch.from_numpy(load_sample_image("china.jpg").copy()).permute(2, 0, 1).float() / 255
    width = round(height * img.shape[2] / img.shape[1])
    if height != img.shape[1]:
        img = F.interpolate(img[None], size=(height, width), mode="area")[0].clamp(0, 1)
    t = time.perf_counter()
    GPNN(precision=precision).sample(img, 1, seed=0, progress=False)
    return time.perf_counter() - t


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=256, help="square image side (patches: (size-6)^2)")
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--e2e", type=int, default=None, metavar="HEIGHT", help="time GPNN end to end instead")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child, args.size, args.repeats)
    if args.e2e:
        s = e2e(args.e2e, args.precision)
        print(f"GPNN one sample of china.jpg at height {args.e2e}, precision {args.precision}: {s:.1f} s")
        return 0
    rows = []
    for prov in args.providers.split(","):
        from fastgen.benchmarking import run_child
        result = run_child([sys.executable, __file__, "--child", prov, "--size", str(args.size),
                            "--repeats", str(args.repeats)])
        if isinstance(result, str):
            print(f"{prov}: {result}", file=sys.stderr)
            continue
        rows.append(result)
        print(json.dumps(rows[-1]), flush=True)
    ref = {r["provider"]: r["median_s"] for r in rows}.get("torch-two-pass")
    print("\n| N x M x D | provider | median s | effective GFLOP/s (2 full passes) | distances computed | "
          "peak MB | time / torch-two-pass |")
    print("|---|---|--:|--:|--:|--:|--:|")
    for r in rows:
        flops = 2 * 2 * r["N"] * r["M"] * r["D"]
        ratio = f"{r['median_s'] / ref:.2f}" if ref else "n/a"
        peak = f"{r['peak_mb']:.0f}" if r["peak_mb"] is not None else "n/a"
        tiles = f"{r['computed_fraction']:.3f}" if r.get("computed_fraction") is not None else "all"
        print(f"| {r['N']} x {r['M']} x {r['D']} | {r['provider']} | {r['median_s']:.2f} | "
              f"{flops / r['median_s'] / 1e9:.0f} | {tiles} | {peak} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
