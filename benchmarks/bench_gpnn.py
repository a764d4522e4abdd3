"""GPNN end to end: one sample of sklearn's china.jpg, the whole pyramid.

    pytest benchmarks/bench_gpnn.py --benchmark-only -k quick --benchmark-json=gpnn.json
    pytest benchmarks/bench_gpnn.py --benchmark-only -k "height427 and fastgen-fp32"   # full size (~10 min)

Inputs: china.jpg (427 x 640) resized (area) to `height` (aspect kept). One call =
GPNN().sample(image, 1, seed=0): default settings (7x7 patches, ratio 4/3 down to 14 px,
10 iterations per level, alpha 0.005, noise 0.75). Providers: fastgen-fp32 and
fastgen-bf16 (the CPU's pruned, incremental PatchIndex searches) and torch-two-pass
(opt-in: GPNN with backend="torch", i.e. every search the public low-memory two-pass
PyTorch method -- minutes even at the quick size). Guard: the sample has the image's
shape, values in [0, 1], and every 7x7 patch of it lies close to some source patch
(mean squared distance to its nearest source patch < 2e-3 per entry).
"""
import torch

from fastgen.benchmarking import Provider, Suite, cases


def inputs(p):
    import torch.nn.functional as F
    from sklearn.datasets import load_sample_image
    img = torch.from_numpy(load_sample_image("china.jpg").copy()).permute(2, 0, 1).float() / 255
    width = round(p["height"] * img.shape[2] / img.shape[1])
    if p["height"] != img.shape[1]:
        img = F.interpolate(img[None], size=(p["height"], width), mode="area")[0].clamp(0, 1)
    return img


def _gpnn(**kw):
    def make(img, p, mode):
        from fastgen.models import GPNN
        model = GPNN(**kw)
        return lambda: model.sample(img, 1, seed=0, progress=False)[0]
    return make


def check(p, img, mode, provider, out):
    import torch.nn.functional as F
    from fastgen.ops import knn
    if out.shape != img.shape or float(out.min()) < 0 or float(out.max()) > 1:
        return f"sample has shape {tuple(out.shape)} and range [{float(out.min()):.3g}, {float(out.max()):.3g}]"
    q = F.unfold(out[None], 7)[0].t().contiguous()
    k = F.unfold(img[None], 7)[0].t().contiguous()
    mse = float(knn(q, k, 1).dist.mean()) / q.shape[1]
    return "ok" if mse < 2e-3 else f"patches far from the source: nearest-patch MSE {mse:.2e}"


SUITE = Suite(
    op="gpnn",
    cases=cases(quick=[dict(height=64)], large=[dict(height=128), dict(height=427)]),
    providers={"fastgen-fp32": Provider(_gpnn(), needs_cpp=True),
               "fastgen-bf16": Provider(_gpnn(precision="bf16"), needs_cpp=True),
               "torch-two-pass": Provider(_gpnn(backend="torch"), opt_in=True)},
    inputs=inputs, check=check, rounds=(3, 1),
    file=__file__,
)

test_gpnn = SUITE.pytest_test()
