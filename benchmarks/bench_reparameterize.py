"""Benchmark of fastgen.ops.reparameterize against the unfused PyTorch expression.

    python benchmarks/bench_reparameterize.py                  # table + CSV row per case
    python benchmarks/bench_reparameterize.py --quick          # two small shapes
    python benchmarks/bench_reparameterize.py --providers fastgen-cpp,torch-unfused,torch-compile
    pytest benchmarks/bench_reparameterize.py -k quick         # pytest-benchmark statistics

Providers, all on the same seeded float32 (mu, logvar, eps) and incoming gradients:
- fastgen-cpp: the fused C++ op (one pass forward, one pass backward);
- torch-unfused: what a VAE writes (fastgen.ops.baselines.reparameterize_unfused:
  exp, mul, add for z; square, exp, sub, sum for kl; autograd for the backward);
- torch-compile: the same expression under torch.compile (opt-in: ~20 s to compile);
- copy: `mu.clone()`, the bandwidth yardstick (allocates its output, as the ops do);
  `copy_`, into a preallocated tensor, is reported too.

Modes: forward (no autograd), backward (the op's backward alone, from a graph built
once, incoming grads for both z and kl), full (forward + backward). Bandwidth counts
useful bytes only: forward reads mu, logvar, eps and writes z (4 arrays); backward
reads dz, mu, logvar, eps and writes dmu, dlogvar (6 arrays); full is 10 arrays; copy
is 2. Extra traffic of the unfused version is its cost, not counted as useful.
The issue's targets: full >= 8x faster than torch-unfused, and >= 50% of the copy's
bandwidth.

Fresh output pages matter at (8192, 1024) float32: each array is 32 MiB, at glibc's
mmap threshold, so every output is a new mapping whose 8192 pages fault on first write
(16 ms per array on the development VM, 4x the time of the copy itself). The fused
op advises transparent huge pages on its own outputs (>= 8 MiB) before writing them
(4 ms per array there); the unfused expression and `copy` use the default allocator.
`THP_MEM_ALLOC_ENABLE=1` (a PyTorch allocator setting, process-wide) gives every large
tensor huge pages; the CSV records whether it was set.
"""
import argparse
import csv
import os
import sys
import warnings

import pytest
import torch

from fastgen.benchmarking import machine_info, machine_line, time_fn

OP = "reparameterize"
DEFAULT_SHAPES = [(8192, 1024), (65536, 64), (128, 16, 32, 32), (256, 16)]
QUICK_SHAPES = [(8192, 1024), (1024, 64)]
MODES = ("forward", "backward", "full")
PROVIDERS = ("fastgen-cpp", "torch-unfused", "torch-compile", "copy", "copy_")
DEFAULT_PROVIDERS = ("fastgen-cpp", "torch-unfused", "copy", "copy_")
ARRAYS = {"forward": 4, "backward": 6, "full": 10}
CSV_FIELDS = ["op", "shape", "dtype", "mode", "provider", "median_s", "p20_s", "p80_s", "gb_per_s",
              "speedup_vs_torch_unfused", "fraction_of_copy_bandwidth", "repeats", "check", "thp_alloc",
              "cpu", "cores", "threads", "loadavg", "torch", "fastgen", "date"]


def make_inputs(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(shape, generator=g).to(dtype)
    logvar = torch.randn(shape, generator=g).to(dtype)
    eps = torch.randn(shape, generator=g).to(dtype)
    grad_z = torch.randn(shape, generator=g).to(dtype)
    grad_kl = torch.randn(shape[0], generator=g)
    return mu, logvar, eps, grad_z, grad_kl


def _op(provider):
    from fastgen.ops import baselines, reparameterize
    if provider == "fastgen-cpp":
        return lambda m, l, e: reparameterize(m, l, e, backend="cpp")
    if provider == "torch-unfused":
        return lambda m, l, e: baselines.reparameterize_unfused(m, l, e)
    if provider == "torch-compile":
        return torch.compile(lambda m, l, e: baselines.reparameterize_unfused(m, l, e), dynamic=False)
    raise ValueError(f"unknown provider {provider!r}; known: {', '.join(PROVIDERS)}")


def make_case(provider, mode, inputs):
    """A no-argument callable that runs `provider` in `mode` on `inputs`."""
    mu, logvar, eps, grad_z, grad_kl = inputs
    if provider in ("copy", "copy_"):
        if mode != "forward":
            return None
        if provider == "copy":
            return lambda: mu.clone()
        out = torch.empty_like(mu)
        return lambda: out.copy_(mu)
    fn = _op(provider)
    if mode == "forward":
        def forward():
            with torch.no_grad():
                return fn(mu, logvar, eps)
        return forward
    m = mu.detach().requires_grad_()
    l = logvar.detach().requires_grad_()
    if mode == "backward":
        z, kl = fn(m, l, eps)
        return lambda: torch.autograd.grad([z, kl], [m, l], [grad_z, grad_kl], retain_graph=True)

    def full():
        z, kl = fn(m, l, eps)
        return torch.autograd.grad([z, kl], [m, l], [grad_z, grad_kl])
    return full


def check(inputs):
    """fastgen-cpp vs the float64 reference on these inputs (warns, never raises)."""
    from fastgen.ops import reference, reparameterize
    mu, logvar, eps = (t[:256] for t in inputs[:3])
    z, kl = reparameterize(mu, logvar, eps, backend="cpp")
    zr, klr = reference.reparameterize_reference(mu.double(), logvar.double(), eps.double())
    ok = torch.allclose(z.double(), zr, rtol=1e-4, atol=1e-4) and torch.allclose(kl.double(), klr, rtol=1e-4)
    if not ok:
        warnings.warn("fastgen-cpp reparameterize disagrees with the float64 reference", stacklevel=2)
    return "ok" if ok else "mismatch"


def useful_bytes(shape, mode, provider, elem=4):
    n = 1
    for s in shape:
        n *= s
    return (2 if provider in ("copy", "copy_") else ARRAYS[mode]) * n * elem


def run_suite(shapes, providers, modes=MODES, repeats=20, progress=print):
    info = machine_info()
    rows = []
    for shape in shapes:
        inputs = make_inputs(shape)
        ok = check(inputs)
        by = {}
        for mode in modes:
            for p in providers:
                fn = make_case(p, mode, inputs)
                if fn is None:
                    continue
                t = time_fn(fn, repeats=repeats, warmup=2 if p == "torch-compile" else 1)
                gbs = useful_bytes(shape, mode, p) / t["median_s"] / 1e9
                row = {"op": OP, "shape": "x".join(map(str, shape)), "dtype": "float32", "mode": mode,
                       "provider": p, **t, "gb_per_s": gbs, "repeats": repeats,
                       "check": ok if p == "fastgen-cpp" else "",
                       "thp_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE", "0"), **info}
                by[(mode, p)] = row
                rows.append(row)
                del fn
        copy = by.get(("forward", "copy"))
        for (mode, p), row in by.items():
            base = by.get((mode, "torch-unfused"))
            row["speedup_vs_torch_unfused"] = base["median_s"] / row["median_s"] if base else float("nan")
            row["fraction_of_copy_bandwidth"] = row["gb_per_s"] / copy["gb_per_s"] if copy else float("nan")
            if progress:
                progress(f"{OP} {row['shape']:>14s} {mode:8s} {p:14s} {row['median_s'] * 1e3:9.3f} ms "
                         f"[{row['p20_s'] * 1e3:.3f}, {row['p80_s'] * 1e3:.3f}]  {row['gb_per_s']:7.2f} GB/s  "
                         f"x{row['speedup_vs_torch_unfused']:5.2f} vs unfused  "
                         f"{100 * row['fraction_of_copy_bandwidth']:5.1f}% of copy")
    return rows


def append_csv(rows, path):
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerows(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small shapes only")
    p.add_argument("--shapes", default=None, help="e.g. '8192x1024,128x16x32x32'")
    p.add_argument("--providers", default=",".join(DEFAULT_PROVIDERS), help=f"from {', '.join(PROVIDERS)}")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--csv", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "reparameterize.csv"))
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    shapes = ([tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")] if a.shapes
              else QUICK_SHAPES if a.quick else DEFAULT_SHAPES)
    providers = a.providers.split(",")
    bad = [x for x in providers if x not in PROVIDERS]
    if bad:
        p.error(f"unknown provider(s) {bad}; known: {', '.join(PROVIDERS)}")
    print(machine_line())
    rows = run_suite(shapes, providers, a.modes.split(","), a.repeats)
    append_csv(rows, a.csv)
    print(f"appended {len(rows)} rows to {a.csv}")
    return 0


# ---- pytest-benchmark --------------------------------------------------------------------

SHAPE_PARAMS = ([pytest.param(s, id="quick-" + "x".join(map(str, s))) for s in QUICK_SHAPES]
                + [pytest.param(s, id="large-" + "x".join(map(str, s)), marks=pytest.mark.slow)
                   for s in DEFAULT_SHAPES])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPE_PARAMS)
@pytest.mark.parametrize("provider", DEFAULT_PROVIDERS)
def test_reparameterize(benchmark, provider, shape, mode):
    from fastgen import _ext
    if provider == "fastgen-cpp" and not _ext.CPP_AVAILABLE:
        pytest.skip(f"C++ extension not built: {_ext.CPP_ERROR}")
    inputs = make_inputs(shape)
    fn = make_case(provider, mode, inputs)
    if fn is None:
        pytest.skip(f"{provider} has no {mode} mode")
    benchmark.group = f"{OP} {'x'.join(map(str, shape))} {mode}"
    benchmark.extra_info.update({"op": OP, "shape": list(shape), "mode": mode, "provider": provider,
                                 "useful_bytes": useful_bytes(shape, mode, provider),
                                 "threads": torch.get_num_threads()})
    if provider == "fastgen-cpp":
        benchmark.extra_info["check"] = check(inputs)
    benchmark.pedantic(fn, rounds=10, iterations=1, warmup_rounds=1)


if __name__ == "__main__":
    sys.exit(main())
