"""prior_sampling: drawing code maps from a gated PixelCNN prior (VQ-VAE / VQ-VAE-2),
incrementally (GatedPixelCNN.sample: each layer's vertical features once per row, its
horizontal features once per position) against rerunning the whole network for every
position (sample_naive: what the public VQ-VAE-2 code does).

    pytest benchmarks/bench_prior_sampling.py --benchmark-only --benchmark-json=p.json

Priors with fixed random weights (speed does not depend on training): 64 channels, 8
gated layers, kernel 3, 512 codes -- the `fastgen train prior` defaults; the bottom-prior
cases carry a 32-channel conditioning map (the top codes); attn "every" puts a causal
attention block after every gated layer (the PixelSNAIL-style prior, `--attention every`).
n maps per call. Guard: the codes equal the incremental sampler's for the same generator seed.
"""
import torch

from fastgen.benchmarking import Provider, Suite, agrees_with, cases


def inputs(p):
    from fastgen.models import GatedPixelCNN
    torch.manual_seed(0)
    net = GatedPixelCNN(512, (p["H"], p["W"]), dim=64, layers=8, kernel=3,
                        cond_channels=p["cond"] or None, attention=p.get("attn", False)).eval()
    cond = torch.randn(p["n"], p["cond"], p["H"], p["W"]) if p["cond"] else None
    return net, cond


def _sampler(naive):
    def make(x, p, mode):
        net, cond = x
        f = net.sample_naive if naive else net.sample
        return lambda: f(p["n"], generator=torch.Generator().manual_seed(1), cond=cond)
    return make


SUITE = Suite(
    op="prior_sampling",
    cases=cases(quick=[dict(H=4, W=4, cond=0, n=16), dict(H=8, W=8, cond=32, n=16)],
                large=[dict(H=16, W=16, cond=32, n=16), dict(H=16, W=16, cond=32, n=16, attn="every")]),
    providers={"incremental": Provider(_sampler(False)), "naive": Provider(_sampler(True))},
    inputs=inputs,
    check=agrees_with("incremental", _sampler(False),
                      lambda out, ref: None if torch.equal(out, ref) else f"{int((out != ref).sum())} codes"),
    baselines=("naive",),
    rounds=(3, 1),
    file=__file__,
)

test_prior_sampling = SUITE.pytest_test()
