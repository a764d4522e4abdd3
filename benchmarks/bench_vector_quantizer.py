"""Benchmark of fastgen.nn.VectorQuantizer against vector-quantize-pytorch's VectorQuantize.

    python benchmarks/bench_vq.py                       # the issue's shapes (minutes on 2 cores)
    python benchmarks/bench_vq.py --quick               # one small shape, a smoke run
    python benchmarks/bench_vq.py --shapes 32768x64x512 --providers fastgen,vector-quantize-pytorch

One training step of the layer, CPU float32, EMA codebook (decay 0.99, commitment 0.25),
on the same seeded inputs (N, D) and the same incoming gradient:
forward, then backward of (z_q * grad).sum() + the layer's losses. Providers:
- fastgen: fastgen.nn.VectorQuantizer(K, D, ema=True) (nearest_code lookup, scatter
  EMA statistics, no N x K buffer);
- vector-quantize-pytorch: VectorQuantize(dim=D, codebook_size=K, decay=0.99,
  commitment_weight=0.25) with its defaults otherwise (EMA, no k-means init);
- torch-onehot (opt-in): the textbook layer (fastgen.ops.reference: float64 distance
  matrix, one-hot, one-hot statistics) - small shapes only.

Each (shape, provider) runs in a fresh Python process: inputs built, one small
warm-up step (library start-up is not charged to the op), then freed heap handed back
(malloc_trim), the peak-RSS mark reset (`echo 5 > /proc/self/clear_refs`), one warm-up
step and `--repeats` timed steps; peak MB = VmHWM - the RSS at the reset (what the step
needs on top of its inputs and the layer). Time = median (p20, p80) of the timed steps.
`check` = share of the first 4096 rows (warm-up step) whose code is the exact nearest
code (fastgen.ops.reference.knn_exact on that step's codebook).

The issue's target at (N, D, K) = (32768, 64, 512) and (65536, 256, 8192): fastgen
>= 10x faster and <= 1/5 of the peak memory of vector-quantize-pytorch.
"""
import argparse
import datetime
import json
import math
import os
import sys

import torch

DEFAULT_SHAPES = [(32768, 64, 512), (65536, 256, 8192)]   # (N, D, K)
QUICK_SHAPES = [(4096, 32, 256)]
# fastgen-bf16: the certified bf16 lookup, which returns the same (exact) codes as fp32
PROVIDERS = ("fastgen", "fastgen-bf16", "vector-quantize-pytorch", "torch-onehot")
DEFAULT_PROVIDERS = ("fastgen", "fastgen-bf16", "vector-quantize-pytorch")
BASELINE = "vector-quantize-pytorch"
CHECK_ROWS = 4096


def make_inputs(N, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, D, generator=g), torch.randn(N, D, generator=g)


class _OneHotVQ(torch.nn.Module):
    """The textbook EMA layer, for small shapes (N x K matrices in float64)."""

    def __init__(self, K, D):
        super().__init__()
        self.register_buffer("codebook", torch.empty(K, D).uniform_(-1 / K, 1 / K))
        self.register_buffer("cluster_size", torch.ones(K, dtype=torch.float64))
        self.register_buffer("embed_sum", self.codebook.double().clone())

    def forward(self, x):
        from fastgen.ops import reference
        z_q, idx, commit, _, one_hot = reference.vector_quantize_reference(x, self.codebook)
        with torch.no_grad():
            self.cluster_size, self.embed_sum, cb = reference.vq_ema_update_reference(
                x, one_hot, self.cluster_size, self.embed_sum)
            self.codebook.copy_(cb)
        return z_q, idx, commit


def make_layer(provider, N, D, K):
    """(step(x) -> (z_q (N, D), idx (N,), loss), codebook() -> the (K, D) codes the next step uses)."""
    if provider in ("fastgen", "fastgen-bf16"):
        from fastgen.nn import VectorQuantizer
        vq = VectorQuantizer(K, D, ema=True, decay=0.99, commitment=0.25,
                             precision="bf16" if provider == "fastgen-bf16" else "fp32").train()

        def step(x):
            out = vq(x)
            return out.quantized, out.indices, sum(out.losses.values())
        return step, lambda: vq.codebook
    if provider == "vector-quantize-pytorch":
        from vector_quantize_pytorch import VectorQuantize
        vq = VectorQuantize(dim=D, codebook_size=K, decay=0.99, commitment_weight=0.25).train()

        def step(x):
            q, idx, loss = vq(x.unsqueeze(0))
            return q[0], idx[0], loss.sum()
        return step, lambda: vq._codebook.embed[0]
    if provider == "torch-onehot":
        vq = _OneHotVQ(K, D).train()
        return (lambda x: vq(x)), lambda: vq.codebook
    raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")


def _measure_here(provider, N, D, K, repeats, seed, threads):
    """Child process body (see the module docstring)."""
    import gc

    from fastgen.benchmarking import _peak_kb, _release_free_heap, _reset_peak_kb, time_fn
    from fastgen.ops import reference
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    x, grad = make_inputs(N, D, seed)
    x.requires_grad_()
    step, codebook = make_layer(provider, N, D, K)
    # start-up: one step on a small slice; also the correctness check against the exact lookup
    rows = min(N, CHECK_ROWS)
    small = x.detach()[:rows].clone().requires_grad_()
    before = codebook().detach().clone()
    z_q, idx, loss = step(small)
    ((z_q * grad[:rows]).sum() + loss).backward()
    _, exact = reference.knn_exact(small.detach(), before, 1)
    check = float((idx.reshape(-1) == exact[:, 0]).double().mean())
    del z_q, idx, loss, small, before, exact

    def train_step():
        x.grad = None
        z_q, _, loss = step(x)
        ((z_q * grad).sum() + loss).backward()

    gc.collect()
    _release_free_heap()
    base_kb, method = _reset_peak_kb()
    t = time_fn(train_step, repeats=repeats, warmup=1)
    t["peak_mb"] = max(0, _peak_kb(method) - base_kb) / 1024.0
    t["mem_method"] = method
    t["check"] = check
    return t


def measure_in_subprocess(provider, N, D, K, repeats=3, seed=0, threads=None, timeout=None):
    spec = dict(provider=provider, N=N, D=D, K=K, repeats=repeats, seed=seed,
                threads=threads or torch.get_num_threads())
    from fastgen.benchmarking import run_child
    result = run_child([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)], timeout)
    if isinstance(result, str):
        nan = float("nan")
        return {"median_s": nan, "p20_s": nan, "p80_s": nan, "peak_mb": nan, "error": result}
    return result


def provider_unavailable(name):
    if name == "vector-quantize-pytorch":
        try:
            import vector_quantize_pytorch  # noqa: F401
        except ImportError as exc:
            return f"not installed ({exc}); pip install --no-deps vector-quantize-pytorch einops einx ..."
    return None


def _fmt(v, spec):
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def format_table(rows, command, repeats):
    from fastgen.benchmarking import machine_line
    lines = [
        "## vector quantizer (EMA, forward + backward, CPU float32)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine_line()}  ",
        f"Date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')}  ",
        f"Repeats: {repeats} timed steps after one warm-up, each (provider, shape) in a fresh process; "
        "peak MB = peak RSS above the inputs and the layer.",
        "",
        f"Speedup = {BASELINE}'s median / this row's; memory ratio = this row's peak / {BASELINE}'s "
        "(issue target for fastgen: speedup >= 10, memory ratio <= 0.2). "
        "check = share of rows given the exact nearest code.",
        "",
        "| N x D x K | provider | median ms | p20 ms | p80 ms | peak MB | speedup | memory ratio | check |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    base = {(r["N"], r["D"], r["K"]): r for r in rows if r["provider"] == BASELINE}
    for r in rows:
        b = base.get((r["N"], r["D"], r["K"]))
        speed = b["median_s"] / r["median_s"] if b and r["median_s"] > 0 else float("nan")
        mem = r["peak_mb"] / b["peak_mb"] if b and b["peak_mb"] > 0 else float("nan")
        check = r.get("error") or _fmt(r.get("check"), ".4f")
        lines.append(f"| {r['N']} x {r['D']} x {r['K']} | {r['provider']} | {_fmt(r['median_s'] * 1e3, '.1f')} | "
                     f"{_fmt(r['p20_s'] * 1e3, '.1f')} | {_fmt(r['p80_s'] * 1e3, '.1f')} | "
                     f"{_fmt(r['peak_mb'], '.1f')} | {_fmt(speed, '.2f')} | {_fmt(mem, '.3f')} | {check} |")
    return "\n".join(lines)


def _shape(text):
    parts = text.lower().replace("*", "x").split("x")
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"a shape is NxDxK (e.g. 32768x64x512), got {text!r}")
    return tuple(int(p) for p in parts)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help=f"shapes {QUICK_SHAPES} only")
    p.add_argument("--shapes", type=lambda s: [_shape(t) for t in s.split(",") if t.strip()], default=None,
                   help="comma-separated NxDxK")
    p.add_argument("--providers", default=",".join(DEFAULT_PROVIDERS), help=f"comma-separated, of {PROVIDERS}")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--timeout", type=float, default=None, help="seconds per (shape, provider) process")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the raw rows here")
    args = p.parse_args(argv)
    if args.child:
        from fastgen.benchmarking import RESULT_TAG
        print(RESULT_TAG + json.dumps(_measure_here(**json.loads(args.child))), flush=True)
        return 0
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    shapes = args.shapes or (QUICK_SHAPES if args.quick else DEFAULT_SHAPES)
    providers = [s.strip() for s in args.providers.split(",") if s.strip()]
    for prov in providers:
        if prov not in PROVIDERS:
            p.error(f"--providers: {prov!r} is not one of {PROVIDERS}")
    rows = []
    for N, D, K in shapes:
        for prov in providers:
            why = provider_unavailable(prov)
            res = ({"median_s": float("nan"), "p20_s": float("nan"), "p80_s": float("nan"),
                    "peak_mb": float("nan"), "error": why} if why else
                   measure_in_subprocess(prov, N, D, K, args.repeats, threads=args.threads, timeout=args.timeout))
            row = dict(N=N, D=D, K=K, provider=prov, **res)
            rows.append(row)
            print(f"  {N}x{D}x{K} {prov}: {_fmt(row['median_s'] * 1e3, '.1f')} ms, "
                  f"{_fmt(row['peak_mb'], '.1f')} MB {row.get('error', '')}", file=sys.stderr, flush=True)
    command = "python benchmarks/bench_vq.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(format_table(rows, command.strip(), args.repeats))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
