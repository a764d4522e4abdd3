"""fastgen.nn.GaussianLatent: a Linear/Conv head -> (mu, logvar) -> (z, kl), fused."""
import math
from typing import NamedTuple

import torch
from torch import nn

from fastgen.ops.reparameterize import reparameterize

LOG_2PI = math.log(2 * math.pi)


class LatentSample(NamedTuple):
    z: torch.Tensor        # (B, latent) or (B, C, H, W), dtype of the head
    kl: torch.Tensor       # (B,) float32, KL(q(z|x) || N(0, I)) in nats, summed over non-batch dims
    mu: torch.Tensor
    logvar: torch.Tensor   # as used for z and kl (after the clamp)
    eps: torch.Tensor | None  # the noise, when it was passed in


class GaussianLatent(nn.Module):
    """Diagonal-Gaussian latent layer for VAEs, drop-in for the usual
    `h -> Linear -> (mu, logvar) -> mu + exp(logvar/2) * randn -> z, kl` block.

    One head (nn.Linear, or nn.Conv2d with `conv=True` for spatial latents (B, C, H, W))
    produces 2 * latent_features values split into mu and logvar; z and the per-row KL
    against N(0, I) come from one fused fastgen.ops.reparameterize call.

    Args:
        in_features: features (channels for conv) of the input h.
        latent_features: latent dimension (channels for conv).
        conv: use a Conv2d head of `kernel_size` (same padding) instead of Linear.
        logvar_clamp: (min, max) applied to logvar before use; the default (-30, 20)
            keeps exp(logvar) finite early in training while std stays in [3e-7, 2e4].
            Clamped entries get zero gradient. None disables it.
        check_finite: raise a ValueError naming mu/logvar if the head produced NaN/inf
            (on by default here: a diverged run should stop with a clear message).
        backend: passed to fastgen.ops.reparameterize.
    """

    def __init__(self, in_features, latent_features, *, conv=False, kernel_size=1,
                 logvar_clamp=(-30.0, 20.0), check_finite=True, backend="auto"):
        super().__init__()
        self.in_features = in_features
        self.latent_features = latent_features
        self.conv = conv
        if conv:
            self.head = nn.Conv2d(in_features, 2 * latent_features, kernel_size, padding=kernel_size // 2)
        else:
            self.head = nn.Linear(in_features, 2 * latent_features)
        self.logvar_clamp = tuple(logvar_clamp) if logvar_clamp is not None else None
        self.check_finite = check_finite
        self.backend = backend

    def forward(self, h, *, sample=True, eps=None, generator=None):
        """h -> LatentSample(z, kl, mu, logvar, eps). sample=False returns z = mu
        (the posterior mean, for reconstructions); eps/generator as in the op."""
        stats = self.head(h)
        mu, logvar = stats.chunk(2, dim=1)
        return self.from_stats(mu, logvar, sample=sample, eps=eps, generator=generator)

    def from_stats(self, mu, logvar, *, sample=True, eps=None, generator=None):
        """The same, for mu and logvar computed elsewhere (your own heads)."""
        if not sample:
            eps = torch.zeros_like(mu)
        z, kl = reparameterize(mu, logvar, eps, generator, logvar_clamp=self.logvar_clamp,
                               check_finite=self.check_finite, backend=self.backend)
        if self.logvar_clamp is not None:
            logvar = logvar.clamp(*self.logvar_clamp)
        return LatentSample(z, kl, mu, logvar, eps)

    @staticmethod
    def log_q(eps, logvar):
        """log q(z|x) per row for z = mu + exp(logvar/2) * eps: sum of N(z; mu, var) densities."""
        dims = tuple(range(1, eps.dim()))
        return -0.5 * (eps.float().square() + logvar.float() + LOG_2PI).sum(dims)

    @staticmethod
    def log_prior(z):
        """log N(z; 0, I) per row."""
        dims = tuple(range(1, z.dim()))
        return -0.5 * (z.float().square() + LOG_2PI).sum(dims)

    def extra_repr(self):
        kind = "conv" if self.conv else "linear"
        return (f"{self.in_features} -> {self.latent_features} ({kind}), logvar_clamp={self.logvar_clamp}, "
                f"check_finite={self.check_finite}, backend={self.backend!r}")
