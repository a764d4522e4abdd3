"""Digit features: a small digits classifier, trained at first use, whose penultimate
layer is the feature space for the Frechet distance and precision / recall on digits --
what Inception is for photos, but it needs no download (Inception's weights cannot be
fetched here) and trains in seconds.

    digit_features(images)     (N, 64) features of (N, 1, H, W) images in [0, 1]
    digit_classes(images)      (N,) predicted class 0..9
    digit_outputs(images)      both (features and class probabilities) in one pass
    class_coverage(fake, real) share of the 10 classes the samples cover, histograms

Training is deterministic: sklearn's digits, the package's fixed train split (seed 0,
the split every `fastgen train --data digits` uses), seeded init and batches, one
thread. The weights are cached as CACHE/digits_classifier_v1.pt (CACHE =
$FASTGEN_CACHE, else $XDG_CACHE_HOME/fastgen, else ~/.cache/fastgen) and reused; a
damaged cache file is retrained and replaced. Images of another size are resized to
8 x 8 (area) first, as the classifier sees digits at sklearn's resolution.
"""
import os
import threading

import torch
import torch.nn as nn
import torch.nn.functional as F

VERSION = 1
FEATURE_DIM = 64
_lock = threading.Lock()
_model = None


class DigitsClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 4 * 4, FEATURE_DIM)
        self.fc2 = nn.Linear(FEATURE_DIM, 10)

    def features(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)       # 8x8 -> 4x4
        return F.relu(self.fc1(x.flatten(1)))

    def forward(self, x):
        return self.fc2(self.features(x))


def cache_dir():
    if os.environ.get("FASTGEN_CACHE"):
        return os.environ["FASTGEN_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fastgen")


def train_classifier(epochs=30, seed=0):
    """(model, held-out accuracy): trained on the digits train split, judged on the test split."""
    from fastgen.data import load_digits
    ds = load_digits()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # one thread: the same weights on every machine run
    # the caller's global RNG is left as it was (a training run that asks for sample
    # metrics mid-run must draw the same noise as one that does not)
    with torch.random.fork_rng(devices=[]):
        return _train(epochs, seed, ds, threads)


def _train(epochs, seed, ds, threads):
    try:
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        model = DigitsClassifier()
        from fastgen.data import digits_labels
        y_train, y_test = digits_labels()
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        x = ds.train
        for _ in range(epochs):
            order = torch.randperm(x.shape[0], generator=g)
            for s in range(0, x.shape[0], 64):
                i = order[s:s + 64]
                # small random shifts: samples of generative models are rarely centred exactly
                xb = torch.roll(x[i], shifts=tuple(torch.randint(-1, 2, (2,), generator=g).tolist()), dims=(2, 3))
                loss = F.cross_entropy(model(xb), y_train[i])
                opt.zero_grad()
                loss.backward()
                opt.step()
        model.eval()
        with torch.no_grad():
            acc = float((model(ds.test).argmax(1) == y_test).double().mean())
    finally:
        torch.set_num_threads(threads)
    return model, acc


class DigitFeatureLoss(torch.nn.Module):
    """The classifier's penultimate features as a differentiable perceptual map for
    training losses: (N, 1, H, W) in [0, 1] -> (N, 64), images pooled to 8 x 8 first. The
    classifier's weights are frozen. (These are also the features the eval's FD uses: a
    model trained on them is judged partly by its own loss -- look at its samples.)"""

    def __init__(self, device="cpu"):
        super().__init__()
        # its own copy: classifier(device) moves the one cached module, which the eval's
        # feature passes may move to another device mid-training
        import copy
        self.net = copy.deepcopy(classifier("cpu")).to(device)
        for p in self.net.parameters():
            p.requires_grad_(False)

    def forward(self, x):
        if x.dim() != 4 or x.shape[1] != 1:
            raise ValueError(f"the digit feature loss needs (N, 1, H, W) images, got {tuple(x.shape)}")
        if tuple(x.shape[-2:]) != (8, 8):
            x = F.adaptive_avg_pool2d(x, (8, 8))
        return self.net.features(x.float())


def classifier(device="cpu"):
    """The cached digits classifier (trained and cached at first use), in eval mode."""
    global _model
    with _lock:
        if _model is None:
            path = os.path.join(cache_dir(), f"digits_classifier_v{VERSION}.pt")
            with torch.random.fork_rng(devices=[]):     # its init must not draw from the caller's RNG
                model = DigitsClassifier()
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                model.load_state_dict(state["model"])
                model.accuracy = float(state["accuracy"])
            except Exception:  # noqa: BLE001 -- missing, truncated or foreign: train anew
                with torch.enable_grad():
                    model, acc = train_classifier()
                model.accuracy = acc
                from fastgen.training import atomic_write
                try:
                    atomic_write(path, lambda f: torch.save({"model": model.state_dict(), "accuracy": acc}, f))
                except OSError:
                    pass      # a read-only cache: train again next time, never fail
            _model = model.eval()
    return _model.to(device)


def _prepare(images, name):
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 1:
        raise ValueError(f"{name} must be (N, 1, H, W) digit images in [0, 1], got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    x = images.detach().float()
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    if tuple(x.shape[-2:]) != (8, 8):
        x = F.adaptive_avg_pool2d(x, (8, 8))
    return x.clamp(0, 1)


@torch.no_grad()
def digit_outputs(images, batch=1024, name="images"):
    """One pass of the classifier: ((N, 64) penultimate features, (N, 10) class probabilities)."""
    x = _prepare(images, name)
    model = classifier(x.device)
    feats, probs = [], []
    for s in range(0, x.shape[0], batch):
        f = model.features(x[s:s + batch])
        feats.append(f)
        probs.append(torch.softmax(model.fc2(f), 1))
    if not feats:
        return x.new_zeros((0, FEATURE_DIM)), x.new_zeros((0, 10))
    return torch.cat(feats), torch.cat(probs)


def digit_features(images, name="images"):
    """(N, 64) penultimate-layer features of digit images (N, 1, H, W) in [0, 1]."""
    return digit_outputs(images, name=name)[0]


def digit_classes(images, name="images"):
    """(N,) predicted digit 0..9."""
    return digit_outputs(images, name=name)[1].argmax(1)


def class_coverage(fake, real, min_share=0.2):
    """How the samples' predicted classes spread over the 10 digits, against the data's.

    fake, real: images, or their predicted classes ((N,) int64, from digit_classes).
    Returns {"class_coverage": share of the classes whose sample frequency is at least
    `min_share` times their data frequency (1.0: every digit generated), "class_tv":
    total variation distance of the two class histograms (0: same mix),
    "class_hist_fake", "class_hist_real": the histograms (fractions)}."""
    def classes(x, name):
        return x if x.dim() == 1 else digit_classes(x, name=name)
    hf = torch.bincount(classes(fake, "fake"), minlength=10).double()
    hr = torch.bincount(classes(real, "real"), minlength=10).double()
    if hf.sum() == 0 or hr.sum() == 0:
        raise ValueError("class_coverage needs at least one fake and one real image")
    hf, hr = hf / hf.sum(), hr / hr.sum()
    present = hr > 0
    covered = (hf >= min_share * hr) & present
    return {"class_coverage": float(covered.sum()) / float(present.sum()), "class_tv": float((hf - hr).abs().sum() / 2),
            "class_hist_fake": [round(float(v), 4) for v in hf], "class_hist_real": [round(float(v), 4) for v in hr]}
