"""patch_nn (GPNN's normalised patch nearest neighbour) on real image patches.

    pytest benchmarks/bench_patch_nn.py --benchmark-only -k quick --benchmark-json=patch_nn.json

Inputs: keys = the 7x7x3 patches of sklearn's china.jpg (a centred square crop resized
to `size` x `size`: (size - 6)^2 patches of D = 147), queries = the same patches plus
N(0, 0.05^2) noise (as at GPNN's coarsest level), alpha = 0.005 * 147 (GPNN's 0.005 on
mean squared differences, in sum units). Providers, all on the same patches:
- fastgen-cpp: patch_nn on the CPU, pruned (its k-means of the keys inside the timed
  call: a one-shot search), fp32 cross term; -bf16: bf16 cross term;
- fastgen-cpp-full (-bf16): prune=False, every tile computed;
- fastgen-index: a PatchIndex built once outside the timed call, one from-scratch
  search timed (what each of GPNN's searches costs when the keys are reused);
- torch-two-pass: the public low-memory method (chunks of 256 query rows through
  addmm: column minimum first, then the normalised argmin; fastgen.ops.baselines).
Guard: on the first 256 queries, the float64 score each answer reaches is the float64
optimum within what fp32 (bf16) rounding allows (`check`; column minima from a direct
float64 recomputation of each key's nearest queries). Work: two passes of 2*N*M*D flops
(the floor without pruning; pruned providers compute a fraction of it).
"""
import torch

from fastgen.benchmarking import Provider, Suite, cases

CHECK_QUERIES = 256


def inputs(p):
    import torch.nn.functional as F
    from sklearn.datasets import load_sample_image
    img = torch.from_numpy(load_sample_image("china.jpg").copy()).permute(2, 0, 1).float()[None] / 255
    h, w = img.shape[-2:]
    side = min(h, w)
    img = img[..., (h - side) // 2:(h + side) // 2, (w - side) // 2:(w + side) // 2]
    img = F.interpolate(img, size=(p["size"], p["size"]), mode="area")
    keys = F.unfold(img, 7).transpose(1, 2)[0].contiguous()
    g = torch.Generator().manual_seed(0)
    queries = (keys + 0.05 * torch.randn(keys.shape, generator=g)).contiguous()
    return {"queries": queries, "keys": keys, "alpha": 0.005 * keys.shape[1]}


def _fastgen(precision, prune):
    def make(x, p, mode):
        from fastgen.ops import patch_nn
        return lambda: patch_nn(x["queries"], x["keys"], x["alpha"], backend="cpp", precision=precision, prune=prune)
    return make


def _index(x, p, mode):
    from fastgen.ops import PatchIndex
    index = PatchIndex(x["keys"], x["alpha"], incremental=False)
    return lambda: index.search(x["queries"])


def _two_pass(x, p, mode):
    from fastgen.ops import baselines
    return lambda: baselines.patch_nn_two_pass(x["queries"], x["keys"], x["alpha"])


def _colmin64(x):
    """float64 min over queries of ||q - k||^2 per key: nearest query by fp32 addmm in row
    chunks, then each key's distance to it and to its runners-up recomputed directly."""
    if "colmin64" not in x:
        q, k = x["queries"], x["keys"]
        best = torch.full((k.shape[0], 4), float("inf"))
        arg = torch.zeros((k.shape[0], 4), dtype=torch.long)
        kn = k.square().sum(1)
        for s in range(0, q.shape[0], 1024):
            d = torch.addmm(kn[None], q[s:s + 1024], k.t(), alpha=-2.0) + q[s:s + 1024].square().sum(1)[:, None]
            v, i = torch.cat([best, d.t()], 1), torch.cat([arg, torch.arange(s, s + d.shape[0]).expand(k.shape[0], -1)], 1)
            best, j = v.topk(4, dim=1, largest=False)
            arg = i.gather(1, j)
        near = q.double()[arg]                                   # (M, 4, D): 4 candidates per key
        x["colmin64"] = (near - k.double()[:, None]).square().sum(-1).min(1).values
    return x["colmin64"]


def check(p, x, mode, provider, out):
    """The float64 score each answer reaches vs the optimum, allowing what fp32 (bf16)
    rounding of distances and column minima can move a score by: each off by at most
    f (||q - c|| + max ||k - c||)^2, f = (3D + 8) 2^-24 (+ 2^-7 in bf16), c the centring
    shift (csrc/engine/error_bound.h; the tests' allowance, twice over)."""
    from fastgen.ops.baselines import centering_shift
    q, k = x["queries"][:CHECK_QUERIES].double(), x["keys"].double()
    colmin = _colmin64(x)
    w = 1.0 / (x["alpha"] + colmin)
    d = torch.cat([(q[:, None, :] - k[None, s:s + 2048]).square().sum(-1) for s in range(0, k.shape[0], 2048)], 1)
    s = d * w
    c = centering_shift(x["keys"]).double()
    qn = (q - c).norm(dim=1)
    kmax = (k - c).norm(dim=1).max()
    f = (3 * q.shape[1] + 8) * 2.0 ** -24 + (2.0 ** -7 if "bf16" in provider else 0.0)
    e_d, e_c = f * (qn + kmax) ** 2, f * (qn.max() + kmax) ** 2
    sigma = (e_d[:, None] + s * e_c) * w + 4 * 2.0 ** -24 * s
    best, opt = s.min(1)
    chosen = out[:CHECK_QUERIES, None].long()
    reached = s.gather(1, chosen)[:, 0]
    slack = 2 * (sigma.gather(1, chosen)[:, 0] + sigma.gather(1, opt[:, None])[:, 0])
    bad = reached > best + slack
    return "ok" if not bad.any() else f"{int(bad.sum())} of {CHECK_QUERIES} queries miss the optimum score"


SUITE = Suite(
    op="patch_nn",
    cases=cases(quick=[dict(size=96)], large=[dict(size=256)]),   # 8.1k and 62.5k patches of 147
    providers={"fastgen-cpp": Provider(_fastgen("fp32", True), needs_cpp=True),
               "fastgen-cpp-bf16": Provider(_fastgen("bf16", True), needs_cpp=True),
               "fastgen-index": Provider(_index, needs_cpp=True),
               "fastgen-cpp-full": Provider(_fastgen("fp32", False), needs_cpp=True),
               "fastgen-cpp-full-bf16": Provider(_fastgen("bf16", False), needs_cpp=True),
               "torch-two-pass": Provider(_two_pass)},
    inputs=inputs, check=check,
    work=lambda p, mode: {"flops": 2 * 2.0 * (p["size"] - 6) ** 4 * 147},
    baselines=("torch-two-pass",), rounds=(3, 2),
    file=__file__,
)

test_patch_nn = SUITE.pytest_test()
