"""transformer_sampling: drawing image codes from the caption-prompted CodeTransformer
with its KV cache (each step runs one new position against the cached keys and values)
against recomputing the whole prefix every step.

    pytest benchmarks/bench_transformer_sampling.py --benchmark-only --benchmark-json=t.json

A transformer with fixed random weights (speed does not depend on training): 512
codes, dim 256, 6 layers, 8 heads, 16 caption bytes, L image tokens, n prompts per call,
no guidance. Guard: the tokens equal the cached sampler's for the same seed. Work: the
flops of one forward over the full sequence per prompt (~24 L_total d^2 per layer, the
least any sampler must do); the recomputing sampler does ~L/2 times that.
"""
import torch

from fastgen.benchmarking import Provider, Suite, agrees_with, cases


def inputs(p):
    from fastgen.models.transformer import CodeTransformer, encode_captions
    torch.manual_seed(0)
    m = CodeTransformer(512, p["L"], text_tokens=16, dim=256, layers=6, heads=8).eval()
    return m, encode_captions(["the digit 7"] * p["n"], 16)


def _sampler(cache):
    def make(x, p, mode):
        m, text = x
        return lambda: m.sample(text, torch.Generator().manual_seed(1), cache=cache)
    return make


SUITE = Suite(
    op="transformer_sampling",
    cases=cases(quick=[dict(L=64, n=8)], large=[dict(L=256, n=8)]),
    providers={"kv-cache": Provider(_sampler(True)), "recompute": Provider(_sampler(False))},
    inputs=inputs,
    check=agrees_with("kv-cache", _sampler(True),
                      lambda out, ref: None if torch.equal(out, ref) else f"{int((out != ref).sum())} tokens"),
    work=lambda p, mode: {"flops": p["n"] * 6 * 24 * (16 + p["L"]) * 256 ** 2},
    baselines=("recompute",),
    rounds=(3, 1),
    file=__file__,
)

test_transformer_sampling = SUITE.pytest_test()
