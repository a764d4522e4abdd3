"""fastgen.models.VAE: Gaussian-latent VAE with an N(0, I) prior, on fastgen.nn.GaussianLatent.

Decoders p(x|z):
- "gaussian": a Gaussian per pixel with mean sigmoid(decoder(z)) and a learned log
  standard deviation, one per pixel ("pixel") or one for the image ("global"). The
  data are quantized (x = k / (levels - 1) in [0, 1]: 17 levels for sklearn digits,
  256 for 8-bit images), so the likelihood is the Gaussian's probability mass on each
  pixel's bin (width 1 / (levels - 1); the end bins extend to -inf / +inf). It is a
  proper probability, so log p(x) in nats and bits/dim are comparable across models
  and cannot run off to +inf on constant pixels (as a density would on the always-black
  border of the digits).
- "bernoulli": p(x|z) = Bernoulli(sigmoid(decoder(z))) per pixel, with binary
  cross-entropy against x. A proper likelihood only for binary data (train with
  --binarize); on grey levels it is the usual "BCE loss", and its nats are not
  comparable with the Gaussian's.

Loss: -(E_q[log p(x|z)] - beta * KL(q(z|x) || p(z))) per image (beta = 1 is the ELBO).
The importance-weighted bound (Burda et al., IWAE) with K samples,
    log p(x) >= log 1/K sum_k p(x|z_k) p(z_k) / q(z_k|x),
tightens with K and is what `iwae` reports, in nats per image and bits per dimension.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from fastgen.models.networks import check_images, make_decoder, make_encoder
from fastgen.nn import GaussianLatent

LIKELIHOODS = ("gaussian", "bernoulli")
VARIANCES = ("pixel", "global")


def _log1mexp(x):
    """log(1 - exp(x)) for x <= 0, stable at both ends (Maechler 2012); NaN-free gradients."""
    near = x > -math.log(2)
    a = torch.where(near, x, torch.full_like(x, -1.0))
    b = torch.where(near, torch.full_like(x, -1.0), x)
    return torch.where(near, torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(b)))


def discretized_gaussian_log_prob(x, mean, log_scale, levels):
    """log P(x) per element, x = k / (levels - 1), of N(mean, exp(log_scale)^2) integrated
    over x's bin [x - h, x + h] (h = half a bin), with the end bins open to -inf / +inf."""
    half = 0.5 / (levels - 1)
    inv = torch.exp(-log_scale)
    lo = (x - half - mean) * inv
    hi = (x + half - mean) * inv
    first = x < half          # the bin of level 0: lower edge at -inf
    last = x > 1 - half       # the bin of the top level: upper edge at +inf
    # Work in the lower tail, where log_ndtr is accurate: mirror bins right of the mean.
    flip = lo > 0
    a = torch.where(flip, -hi, lo)
    b = torch.where(flip, -lo, hi)
    a_open = torch.where(flip, last, first)   # a is -inf
    b_open = torch.where(flip, first, last)   # b is +inf
    log_b = torch.where(b_open, torch.zeros_like(b), torch.special.log_ndtr(torch.where(b_open, 0.0, b)))
    log_a = torch.special.log_ndtr(torch.where(a_open, 0.0, a))
    diff = torch.where(a_open, torch.full_like(a, -math.inf), log_a - log_b)
    return log_b + _log1mexp(torch.clamp(diff, max=-1e-12))


class VAE(nn.Module):
    """Variational autoencoder with an N(0, I) prior.

    Args:
        image_shape: (C, H, W) of the data, values in [0, 1].
        latent_dim: size of z.
        arch: "mlp" (any shape) or "conv" (square, side 8 * 2^k).
        likelihood: "gaussian" (discretized, learned variance) or "bernoulli".
        variance: "pixel" (a learned log-std per pixel) or "global" (one), gaussian only.
        levels: quantization levels of the data (17 for digits, 256 for 8-bit images).
        beta: KL weight in the training loss (1 = the ELBO).
        backend: backend of the fused reparameterization.
    """

    def __init__(self, image_shape, latent_dim=16, arch="mlp", likelihood="gaussian", variance="pixel",
                 levels=256, beta=1.0, backend="auto"):
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        if variance not in VARIANCES:
            raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
        if levels < 2:
            raise ValueError(f"levels must be >= 2, got {levels}")
        self.config = dict(image_shape=tuple(image_shape), latent_dim=latent_dim, arch=arch,
                           likelihood=likelihood, variance=variance, levels=levels, beta=beta, backend=backend)
        self.image_shape = tuple(image_shape)
        self.latent_dim = latent_dim
        self.likelihood = likelihood
        self.levels = levels
        self.beta = beta
        self.encoder = make_encoder(arch, self.image_shape)
        self.latent = GaussianLatent(self.encoder.out_features, latent_dim, backend=backend)
        self.decoder = make_decoder(arch, latent_dim, self.image_shape)
        if likelihood == "gaussian":
            shape = self.image_shape if variance == "pixel" else (1,)
            self.log_scale = nn.Parameter(torch.full(shape, -1.5))

    @property
    def num_dims(self):
        return math.prod(self.image_shape)

    def _log_scale(self):
        # floor at 1/8 of a bin: below that the bin's mass is ~1 already
        return self.log_scale.clamp(math.log(0.125 / (self.levels - 1)), 2.0)

    def log_px_given_z(self, x, logits):
        """log p(x|z) per image (nats), summed over pixels."""
        if self.likelihood == "bernoulli":
            lp = -F.binary_cross_entropy_with_logits(logits, x, reduction="none")
        else:
            lp = discretized_gaussian_log_prob(x, torch.sigmoid(logits), self._log_scale(), self.levels)
        return lp.flatten(1).sum(1)

    def forward(self, x, generator=None):
        """One training step's numbers: dict(loss, elbo, log_px_z, kl), per-image values (B,)
        except `loss` (mean over the batch of -(log p(x|z) - beta * KL))."""
        check_images(x, self.image_shape)
        q = self.latent(self.encoder(x), generator=generator)
        log_px_z = self.log_px_given_z(x, self.decoder(q.z))
        loss = -(log_px_z - self.beta * q.kl).mean()
        return dict(loss=loss, elbo=log_px_z - q.kl, log_px_z=log_px_z, kl=q.kl)

    @torch.no_grad()
    def iwae(self, x, k=64, generator=None, chunk=4096):
        """Importance-weighted lower bound on log p(x) per image (nats), K samples each."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k (importance samples per image) must be an int >= 1, got {k!r}")
        check_images(x, self.image_shape)
        q = self.latent(self.encoder(x), sample=False)
        out = []
        mu_all, lv_all = q.mu, q.logvar
        per = max(1, chunk // k)
        for s in range(0, x.shape[0], per):
            mu, lv, xb = mu_all[s:s + per], lv_all[s:s + per], x[s:s + per]
            b = mu.shape[0]
            mu_k = mu.repeat_interleave(k, 0)
            lv_k = lv.repeat_interleave(k, 0)
            eps = torch.randn(mu_k.shape, generator=generator, dtype=mu.dtype, device=mu.device)
            zk = self.latent.from_stats(mu_k, lv_k, eps=eps).z
            log_w = (self.log_px_given_z(xb.repeat_interleave(k, 0), self.decoder(zk))
                     + GaussianLatent.log_prior(zk) - GaussianLatent.log_q(eps, lv_k))
            out.append(torch.logsumexp(log_w.view(b, k), 1) - math.log(k))
        return torch.cat(out)

    def bits_per_dim(self, log_px):
        """-log p(x) / (D ln 2): a log-likelihood in nats per image -> bits per dimension."""
        return -log_px / (self.num_dims * math.log(2))

    @torch.no_grad()
    def decode_mean(self, z):
        """E[x|z] (the Gaussian mean or Bernoulli probability), in [0, 1]."""
        return torch.sigmoid(self.decoder(z))

    @torch.no_grad()
    def sample(self, n, generator=None, device=None):
        """n images from the model: z ~ N(0, I), x = E[x|z]."""
        device = device or next(self.parameters()).device
        z = torch.randn(n, self.latent_dim, generator=generator, device=device)
        return self.decode_mean(z)

    @torch.no_grad()
    def encode_mean(self, x):
        check_images(x, self.image_shape)
        return self.latent(self.encoder(x), sample=False).mu

    @torch.no_grad()
    def reconstruct(self, x):
        return self.decode_mean(self.encode_mean(x))

    @torch.no_grad()
    def interpolate(self, x_a, x_b, steps=8):
        """(n, steps, C, H, W): decodes of the line between the posterior means of x_a[i] and x_b[i]."""
        za, zb = self.encode_mean(x_a), self.encode_mean(x_b)
        t = torch.linspace(0, 1, steps, device=za.device).view(1, steps, 1)
        z = (za[:, None] * (1 - t) + zb[:, None] * t).reshape(-1, za.shape[1])
        return self.decode_mean(z).view(za.shape[0], steps, *self.image_shape)
