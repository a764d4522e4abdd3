"""Small encoder / decoder blocks shared by the AE and VAE models.

`mlp` works on any image shape; `conv` on square images whose side is 8 * 2^k
(8x8 digits, 16, 32, 64, ...): stride-2 convolutions down to 4x4, and transposed
convolutions back up.
"""
import math

import torch

from torch import nn

ARCHS = ("mlp", "conv")


def conv_fits(image_shape):
    """Whether the conv networks take images of this (C, H, W) shape: square, side 8 * 2^k."""
    _, h, w = image_shape
    return h == w and h >= 8 and not h & (h - 1)


def _conv_levels(image_shape):
    c, h, w = image_shape
    if h != w or h < 8 or h & (h - 1):
        raise ValueError(f"arch='conv' needs square images with a side of 8, 16, 32, 64, ..., "
                         f"got {h}x{w}; resize them (--size) or use arch='mlp'")
    return int(math.log2(h // 4))  # stride-2 steps down to 4x4


class MLPEncoder(nn.Module):
    """(B, C, H, W) -> (B, hidden[-1]) features."""

    def __init__(self, image_shape, hidden=(512, 256)):
        super().__init__()
        layers, d = [nn.Flatten()], math.prod(image_shape)
        for width in hidden:
            layers += [nn.Linear(d, width), nn.ReLU()]
            d = width
        self.net = nn.Sequential(*layers)
        self.out_features = d

    def forward(self, x):
        return self.net(x)


class MLPDecoder(nn.Module):
    """(B, latent) -> (B, out_channels, H, W) unconstrained outputs (logits / means)."""

    def __init__(self, latent_dim, image_shape, hidden=(256, 512), out_channels=None):
        super().__init__()
        c, h, w = image_shape
        self.out_shape = (out_channels or c, h, w)
        layers, d = [], latent_dim
        for width in hidden:
            layers += [nn.Linear(d, width), nn.ReLU()]
            d = width
        layers += [nn.Linear(d, math.prod(self.out_shape))]
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(z).view(z.shape[0], *self.out_shape)


class ConvEncoder(nn.Module):
    """(B, C, S, S) -> (B, hidden) features: 3x3 stem, stride-2 4x4 convs to 4x4, Linear."""

    def __init__(self, image_shape, width=32, hidden=256, max_channels=256):
        super().__init__()
        levels = _conv_levels(image_shape)
        ch = width
        layers = [nn.Conv2d(image_shape[0], ch, 3, padding=1), nn.ReLU()]
        for _ in range(levels):
            nxt = min(ch * 2, max_channels)
            layers += [nn.Conv2d(ch, nxt, 4, stride=2, padding=1), nn.ReLU()]
            ch = nxt
        layers += [nn.Flatten(), nn.Linear(ch * 16, hidden), nn.ReLU()]
        self.net = nn.Sequential(*layers)
        self.out_features = hidden

    def forward(self, x):
        return self.net(x)


class ConvDecoder(nn.Module):
    """(B, latent) -> (B, out_channels, S, S): Linear to 4x4, stride-2 transposed convs, 3x3 out."""

    def __init__(self, latent_dim, image_shape, width=32, hidden=256, max_channels=256, out_channels=None):
        super().__init__()
        levels = _conv_levels(image_shape)
        chans = [min(width * 2 ** (i + 1), max_channels) for i in range(levels)][::-1]  # 4x4 first
        self.top = chans[0]
        self.fc = nn.Sequential(nn.Linear(latent_dim, hidden), nn.ReLU(), nn.Linear(hidden, self.top * 16), nn.ReLU())
        layers, ch = [], self.top
        for nxt in chans[1:] + [width]:
            layers += [nn.ConvTranspose2d(ch, nxt, 4, stride=2, padding=1), nn.ReLU()]
            ch = nxt
        layers += [nn.Conv2d(ch, out_channels or image_shape[0], 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(self.fc(z).view(z.shape[0], self.top, 4, 4))


def check_images(x, image_shape, name="x"):
    """A model's image input: a non-empty floating (B, *image_shape) tensor of finite
    values, else a ValueError/TypeError naming `name` (instead of a matmul shape error or
    a complaint about the latent's `mu` several layers later)."""
    want = "(B, " + ", ".join(map(str, image_shape)) + ")"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a {want} tensor, got {type(x).__name__}")
    if x.dim() != len(image_shape) + 1 or tuple(x.shape[1:]) != tuple(image_shape):
        raise ValueError(f"{name} must be {want} images, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor (images in [0, 1]), got {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 images)")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values")


def make_encoder(arch, image_shape, **kw):
    if arch == "mlp":
        return MLPEncoder(image_shape, **kw)
    if arch == "conv":
        return ConvEncoder(image_shape, **kw)
    raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")


def make_decoder(arch, latent_dim, image_shape, **kw):
    if arch == "mlp":
        return MLPDecoder(latent_dim, image_shape, **kw)
    if arch == "conv":
        return ConvDecoder(latent_dim, image_shape, **kw)
    raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
