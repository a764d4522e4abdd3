"""vector_quantizer: fastgen.nn.VectorQuantizer against vector-quantize-pytorch's VectorQuantize.

    pytest benchmarks/bench_vector_quantizer.py --benchmark-only -k quick --benchmark-json=vq.json
    pytest benchmarks/bench_vector_quantizer.py --benchmark-only -k large      # the large shapes (minutes on 2 cores)
    pytest benchmarks/bench_vector_quantizer.py --benchmark-only --benchmark-providers=torch-onehot,fastgen -k quick

One call = one training step of the layer (mode "full"), CPU float32, EMA codebook
(decay 0.99, commitment 0.25), on the same seeded inputs x (N, D) and the same incoming
gradient: forward, then backward of (z_q * grad).sum() + the layer's losses (x is a
leaf that requires grad, so the step also computes dx, as under an encoder). The layer
holds state (the EMA codebook moves every step), so each provider builds its own,
seeded, inside make: every provider and every process (the peak-memory child too)
starts from its own fresh layer. Providers:
- fastgen: fastgen.nn.VectorQuantizer(K, D, ema=True) (nearest_code lookup, scatter
  EMA statistics, no N x K buffer);
- fastgen-bf16: the same with precision="bf16", the certified bf16 lookup, which
  returns the same (exact) codes as fp32;
- vector-quantize-pytorch: VectorQuantize(dim=D, codebook_size=K, decay=0.99,
  commitment_weight=0.25) with its defaults otherwise (EMA, no k-means init);
  `pip install vector-quantize-pytorch` (benchmarks only), else skipped;
- torch-onehot (opt-in): the textbook layer (fastgen.ops.reference: float64 distance
  matrix, one-hot, one-hot statistics) - small shapes only.

Peak MB (harness, fresh process) is above the inputs and the layer: the layer is built
and has taken one step before the mark is reset. Work: 2*N*K*D flops, the cross term
of the lookup, which dominates the step at large K (275 GFLOP at 65536 x 256 x 8192).

Check: the step's indices on the first 4096 rows against the exact nearest code
(fastgen.ops.reference.knn_exact, float64) in the codebook that step used (the one
before its EMA update). fastgen and fastgen-bf16 must give the exact code on every row
(share 1.0); vector-quantize-pytorch and torch-onehot are reported with their share
and accepted from 0.99 on: vector-quantize-pytorch's fp32 distance matrix may pick the
other code of a near tie (0.2 % of rows at 65536 x 256 x 8192), torch-onehot's float64
argmin may break an exact tie otherwise than knn_exact.

The target at (N, D, K) = (32768, 64, 512) and (65536, 256, 8192): fastgen
>= 10x faster and <= 1/5 of the peak memory of vector-quantize-pytorch.
"""
import torch

from fastgen.benchmarking import Provider, Suite, cases

CHECK_ROWS = 4096
PEER_MIN_SHARE = 0.99


def inputs(p):
    g = torch.Generator().manual_seed(0)
    return torch.randn(p["N"], p["D"], generator=g), torch.randn(p["N"], p["D"], generator=g)


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


def _layer(provider, p):
    """(step(x) -> (z_q (N, D), idx (N,), loss), codebook() -> the (K, D) codes the next step uses)."""
    D, K = p["D"], p["K"]
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
    vq = _OneHotVQ(K, D).train()
    return (lambda x: vq(x)), lambda: vq.codebook


def _provider(name):
    def make(inp, p, mode):
        torch.manual_seed(0)                  # the layer's initial codebook: the same in every process
        step, codebook = _layer(name, p)
        x = inp[0].detach().requires_grad_()  # this provider's own leaf (its own x.grad)
        grad = inp[1]
        calls = [0]

        def train_step():
            # the first call (the one the check judges) also keeps the codebook it used;
            # the timed calls do not pay for that copy
            before = codebook().detach().clone() if calls[0] == 0 else None
            calls[0] += 1
            x.grad = None
            z_q, idx, loss = step(x)
            ((z_q * grad).sum() + loss).backward()
            return idx.detach().reshape(-1), before
        return train_step
    return make


def check(p, inp, mode, provider, out):
    """Share of the first CHECK_ROWS rows given the exact nearest code (module docstring)."""
    from fastgen.ops import reference
    idx, before = out
    rows = min(p["N"], CHECK_ROWS)
    _, exact = reference.knn_exact(inp[0][:rows], before, 1)
    share = float((idx[:rows].long() == exact[:, 0]).double().mean())
    need = 1.0 if provider.startswith("fastgen") else PEER_MIN_SHARE
    if share < need:
        return f"exact nearest code on {share:.4f} of the first {rows} rows (needs {need:g})"
    return f"ok (exact {share:.4f})"


SUITE = Suite(
    op="vector_quantizer",
    cases=cases(quick=[dict(N=4096, D=32, K=256)],
                large=[dict(N=32768, D=64, K=512), dict(N=65536, D=256, K=8192)]),
    providers={"fastgen": Provider(_provider("fastgen")),
               "fastgen-bf16": Provider(_provider("fastgen-bf16")),
               "vector-quantize-pytorch": Provider(_provider("vector-quantize-pytorch"),
                                                   requires=("vector_quantize_pytorch",)),
               "torch-onehot": Provider(_provider("torch-onehot"), opt_in=True)},
    inputs=inputs, modes=("full",), check=check,
    work=lambda p, mode: {"flops": 2.0 * p["N"] * p["K"] * p["D"]},
    baselines=("vector-quantize-pytorch",),
    rounds=(5, 3),
    file=__file__,
)

test_vector_quantizer = SUITE.pytest_test()
