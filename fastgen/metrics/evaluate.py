"""fastgen.metrics.evaluate: every sample-quality number for one (real, fake) pair, and
the loaders `fastgen eval` uses (feature files, image folders, checkpoints to sample).

    evaluate_samples(real, fake, features="digits", k=5) -> dict
        n_real, n_fake, fd (Frechet distance of the features), precision, recall,
        density, coverage (k-NN balls, exact), and with digit features class_coverage,
        class_tv, the class histograms and confident (the share of the fake images the
        digits classifier labels with probability > 0.8: samples a reader can read).

real / fake are images (N, C, H, W) in [0, 1] or features (N, D). features: "digits"
(the cached digits classifier's penultimate layer, fastgen.metrics.digit_features),
"raw" (the pixels, flattened), an nn.Module or a callable mapping an image batch to
(N, D), or the path of a TorchScript file. Features that are given already (2-D
inputs) are used as they are.
"""
import os

import torch

from fastgen.metrics.digit_features import class_coverage, digit_outputs
from fastgen.metrics.frechet import frechet_distance
from fastgen.metrics.prdc import precision_recall_density_coverage

ORDER = ["n_real", "n_fake", "fd", "precision", "recall", "density", "coverage", "class_coverage", "class_tv",
         "confident", "train_minutes"]
CONFIDENT = 0.8     # the classifier probability above which a sample counts as legible


def _extractor(features):
    """The feature function of a non-digits `features` argument."""
    if features == "raw":
        return lambda x: x.flatten(1).float()
    if isinstance(features, (str, os.PathLike)):
        path = os.fspath(features)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"features {path!r}: not 'digits', 'raw' or a TorchScript file")
        try:
            module = torch.jit.load(path, map_location="cpu").eval()
        except RuntimeError as e:
            raise ValueError(f"features {path!r} is not a TorchScript file (torch.jit.save): {e}") from None
        features = module
    if isinstance(features, torch.nn.Module):
        module = features.eval()
        dev = next(iter(module.parameters()), torch.empty(0)).device

        @torch.no_grad()
        def run(x, batch=256):
            return torch.cat([module(x[s:s + batch].to(dev)).flatten(1).float().cpu() for s in range(0, x.shape[0], batch)])
        return run
    if callable(features):
        return features
    raise TypeError(f"features must be 'digits', 'raw', a TorchScript path, an nn.Module or a callable, got {features!r}")


def _check(x, name):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of images (N, C, H, W) or features (N, D), got {type(x).__name__}")
    if x.dim() not in (2, 4):
        raise ValueError(f"{name} must be images (N, C, H, W) or features (N, D), got shape {tuple(x.shape)}")
    if x.is_floating_point() and x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    if x.dim() == 4 and x.is_floating_point() and x.numel():
        lo, hi = float(x.min()), float(x.max())
        if not (lo >= -1e-6 and hi <= 1 + 1e-6):
            raise ValueError(f"{name} images must be in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")
    return x


def evaluate_samples(real, fake, features="digits", k=5, backend="auto"):
    """The metrics dict (see the module docstring)."""
    real, fake = _check(real, "real"), _check(fake, "fake")
    if real.dim() != fake.dim():
        raise ValueError(f"real is {'images' if real.dim() == 4 else 'features'} but fake is "
                         f"{'images' if fake.dim() == 4 else 'features'}; give both as the same kind")
    images = real.dim() == 4
    if images:
        if real.shape[1:] != fake.shape[1:] and features == "raw":
            raise ValueError(f"real images are {tuple(real.shape[1:])} but fake ones {tuple(fake.shape[1:])}")
        if features == "digits" and (real.shape[1] != 1 or fake.shape[1] != 1):
            raise ValueError("digit features need 1-channel images; pass features='raw', a module or a TorchScript file")
        if features == "digits":     # features and classes from one pass of the classifier
            (fr, pr), (ff, pf) = digit_outputs(real.float(), name="real"), digit_outputs(fake.float(), name="fake")
        else:
            f = _extractor(features)
            fr, ff = f(real.float()), f(fake.float())
    else:
        fr, ff = real.float(), fake.float()
    for t, name in ((fr, "real"), (ff, "fake")):
        if t.shape[0] <= k:
            raise ValueError(f"{name} has {t.shape[0]} points; precision/recall need more than k={k}")
    out = {"n_real": fr.shape[0], "n_fake": ff.shape[0], "fd": frechet_distance(fr, ff)}
    out.update(precision_recall_density_coverage(fr.contiguous(), ff.contiguous(), k, backend=backend))
    if images and features == "digits":
        out.update(class_coverage(pf.argmax(1), pr.argmax(1)))
        out["confident"] = float((pf.max(1).values > CONFIDENT).float().mean())
    return out


def format_table(rows, names=None):
    """Markdown table of metric dicts (one row each; names: the first column)."""
    keys = [k for k in ORDER if any(k in r for r in rows)]
    head = (["model"] if names else []) + keys
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i == 0 and names else "--:" for i in range(len(head))) + "|"]
    for i, r in enumerate(rows):
        cells = [names[i]] if names else []
        for key in keys:
            v = r.get(key)
            cells.append("" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
