"""prdc: precision / recall / density / coverage of 'fake' features against 'real' ones
-- k-NN radii of both sets and the two ball-count sweeps (fastgen.ops.ball_count) --
against the `prdc` package (Naeem et al.) and the implementation fastgen had before
ball_count (float64 differences broadcast over row chunks).

    pytest benchmarks/bench_prdc.py --benchmark-only -k quick --benchmark-json=p.json

Inputs: real = N standard-normal vectors through a fixed random mixing matrix (D
features, correlated like network features), fake = M vectors of the same law scaled by
1.1 and shifted by 0.05; k = 5 (the papers'). Providers: fastgen (fp32 cross term),
fastgen-bf16 (bf16 cross term, same answers), prdc (sklearn's N x M float distance
matrices: skipped where the three matrices would pass 12 GB), fastgen-0.2 (the old
broadcast loop: skipped past 2e10 element differences, hours). Guard: the four numbers
equal those of fastgen fp32 (computed once; at the small sizes fastgen fp32 itself is
checked against prdc in tests/test_prdc.py). Work: 2 D (N^2 + M^2 + 2 N M) flops (the
four sweeps).
"""
import torch

from fastgen.benchmarking import Provider, Suite, agrees_with, cases


def inputs(p):
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(p["D"], p["D"], generator=g) / p["D"] ** 0.5
    real = torch.randn(p["N"], p["D"], generator=g) @ mix
    fake = (torch.randn(p["M"], p["D"], generator=g) @ mix) * 1.1 + 0.05
    return real.contiguous(), fake.contiguous()


def _fastgen(precision):
    def make(x, p, mode):
        from fastgen.metrics import precision_recall_density_coverage
        return lambda: precision_recall_density_coverage(x[0], x[1], p["k"], precision=precision)
    return make


def _prdc(x, p, mode):
    import pytest
    need = 8 * (p["N"] ** 2 + p["M"] ** 2 + p["N"] * p["M"]) / 1e9
    if need > 12:
        pytest.skip(f"prdc's distance matrices need {need:.0f} GB here (machine: 24 GB)")
    import contextlib
    import io

    from prdc import compute_prdc
    a, b = x[0].numpy(), x[1].numpy()

    def run():
        with contextlib.redirect_stdout(io.StringIO()):     # it prints the set sizes
            out = compute_prdc(a, b, nearest_k=p["k"])
        return {k: float(v) for k, v in out.items()}
    return run


def _old(x, p, mode):
    """fastgen 0.2's membership test: float64 differences per row chunk."""
    import pytest
    if p["N"] * p["M"] * p["D"] > 2e10:
        pytest.skip("the float64 broadcast loop would take hours at this size")
    from fastgen.ops import knn

    def counts(points, centres, r2):
        c64 = centres.double()
        rows = max(1, (1 << 24) // (centres.shape[0] * centres.shape[1]))
        cnt = torch.empty(points.shape[0], dtype=torch.long)
        near = torch.empty(points.shape[0])
        for s in range(0, points.shape[0], rows):
            d2 = (points[s:s + rows].double()[:, None] - c64[None]).pow_(2).sum(-1).float()
            cnt[s:s + rows] = (d2 <= r2[None]).sum(1)
            near[s:s + rows] = d2.min(1).values
        return cnt, near

    def run():
        k = p["k"]
        rr = knn(x[0], x[0], k, exclude_self=True)[0][:, k - 1]
        rf = knn(x[1], x[1], k, exclude_self=True)[0][:, k - 1]
        in_real, _ = counts(x[1], x[0], rr)
        in_fake, nf = counts(x[0], x[1], rf)
        return {"precision": float((in_real > 0).double().mean()), "recall": float((in_fake > 0).double().mean()),
                "density": float(in_real.double().sum() / (k * x[1].shape[0])),
                "coverage": float((nf <= rr).double().mean())}
    return run


def _differs(out, ref):
    bad = [f"{k} {out[k]!r} != {ref[k]!r}" for k in ref if abs(out[k] - ref[k]) > 1e-12]
    return "; ".join(bad) or None


SUITE = Suite(
    op="prdc",
    cases=cases(quick=[dict(N=2000, M=2000, D=256, k=5)],
                large=[dict(N=10000, M=10000, D=2048, k=5), dict(N=50000, M=50000, D=2048, k=5)]),
    providers={"fastgen": Provider(_fastgen("fp32"), needs_cpp=True),
               "fastgen-bf16": Provider(_fastgen("bf16"), needs_cpp=True),
               "prdc": Provider(_prdc, requires=("prdc", "sklearn")),
               "fastgen-0.2": Provider(_old, needs_cpp=True)},
    inputs=inputs, check=agrees_with("fastgen", _fastgen("fp32"), _differs),
    work=lambda p, mode: {"flops": 2.0 * p["D"] * (p["N"] ** 2 + p["M"] ** 2 + 2 * p["N"] * p["M"])},
    baselines=("prdc", "fastgen-0.2"),
    rounds=(3, 1),
    file=__file__,
)

test_prdc = SUITE.pytest_test()
