"""imle_round: one IMLE round on digits, end to end -- generate samples_per_point
samples per data point, find every point's nearest sample, one epoch of updates --
fastgen's IMLE against the same loop written in plain PyTorch.

    pytest benchmarks/bench_imle.py --benchmark-only --benchmark-json=i.json

Inputs: sklearn digits (the 1,437-image training split, 8x8, D=64), 10 samples per
point, the built-in MLP generator (z 64 -> 256 -> 512 -> 64), the same initial
weights for both providers; batch 64, Adam (1e-3, betas 0.5/0.999).
Providers: fastgen (IMLE.search: samples generated and searched in chunks of 4,096 by
StreamingKNN, exact; then the epoch through IMLE.forward), torch-cdist (the plain loop:
all codes drawn, each chunk of 4,096 samples generated, torch.cdist against the data
and a running min/argmin, then the same epoch). Each row's check reports the split
generate / search / update of its checked call. Guard: both loops' mean nearest
distances after the search agree within 10 % (they draw different codes); that the
search is exact is tested in tests/test_imle.py. Work: 2*N*(10 N)*D (the search's
cross term).
"""
import time

import torch

from fastgen.benchmarking import Provider, Suite, cases

SPP, CHUNK, BATCH = 10, 4096, 64
_SPLIT = {}


def inputs(p):
    from fastgen.data import load_digits
    from fastgen.models import IMLE
    x = load_digits().train
    torch.manual_seed(0)
    state = IMLE((1, 8, 8), samples_per_point=SPP, chunk=CHUNK).state_dict()
    return x, state


def _model(x, state):
    from fastgen.models import IMLE
    m = IMLE((1, 8, 8), samples_per_point=SPP, chunk=CHUNK)
    m.load_state_dict(state)
    return m.attach(x)


def _epoch(model, x, opt, gen, loss_of):
    perm = torch.randperm(x.shape[0], generator=gen)
    for s in range(0, x.shape[0], BATCH):
        loss = loss_of(perm[s:s + BATCH])
        opt.zero_grad()
        loss.backward()
        opt.step()


def _fastgen(data, p, mode):
    x, state = data

    def run():
        model = _model(x, state)
        opt = torch.optim.Adam(model.parameters(), 1e-3, betas=(0.5, 0.999))
        t0 = time.perf_counter()
        info = model.search(x, generator=torch.Generator().manual_seed(1))
        t1 = time.perf_counter()
        _epoch(model, x, opt, torch.Generator().manual_seed(2), lambda i: model(i)["loss"])
        t2 = time.perf_counter()
        _SPLIT["fastgen"] = {"generate": info["seconds_generate"], "search": info["seconds_search"],
                             "update": t2 - t1, "round bookkeeping": t1 - t0 - info["seconds_generate"]
                             - info["seconds_search"]}
        return info["mean_nearest_dist"]
    return run


def _plain(data, p, mode):
    x, state = data

    def run():
        model = _model(x, state)
        gen, feats = model.generator, x.flatten(1)
        opt = torch.optim.Adam(model.parameters(), 1e-3, betas=(0.5, 0.999))
        n = x.shape[0]
        t_gen = t_search = 0.0
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            z = torch.randn(n * SPP, 64, generator=g)
            best = torch.full((n,), float("inf"))
            arg = torch.zeros(n, dtype=torch.long)
            for s in range(0, z.shape[0], CHUNK):
                t0 = time.perf_counter()
                samples = torch.sigmoid(gen(z[s:s + CHUNK])).flatten(1)
                t1 = time.perf_counter()
                d, i = torch.cdist(feats, samples).min(1)
                better = d < best
                best, arg = torch.where(better, d, best), torch.where(better, i + s, arg)
                t_search += time.perf_counter() - t1
                t_gen += t1 - t0
        chosen = z[arg]
        t2 = time.perf_counter()

        def loss_of(i):
            noisy = chosen[i] + 0.01 * torch.randn(i.numel(), 64)
            return (torch.sigmoid(gen(noisy)).flatten(1) - feats[i]).square().sum(1).mean()
        _epoch(model, x, opt, torch.Generator().manual_seed(2), loss_of)
        _SPLIT["torch-cdist"] = {"generate": t_gen, "search": t_search, "update": time.perf_counter() - t2}
        return float(best.square().mean())
    return run


def check(p, data, mode, provider, out):
    other = _fastgen if provider != "fastgen" else _plain
    ref = other(data, p, mode)()
    if not (abs(out - ref) <= 0.1 * ref):
        return f"mean nearest distance {out:.4g} vs the other loop's {ref:.4g}"
    split = ", ".join(f"{k} {1000 * v:.0f} ms" for k, v in _SPLIT[provider].items())
    return f"ok ({split})"


SUITE = Suite(
    op="imle_round",
    cases=cases(quick=[dict(N=1437, spp=SPP, D=64)]),
    providers={"fastgen": Provider(_fastgen, needs_cpp=True), "torch-cdist": Provider(_plain)},
    inputs=inputs, check=check, modes=("round",),       # with gradients (the harness's "forward" has none)
    work=lambda p, mode: {"flops": 2.0 * p["N"] * p["N"] * p["spp"] * p["D"]},
    baselines=("torch-cdist",),
    file=__file__,
)

test_imle_round = SUITE.pytest_test()
