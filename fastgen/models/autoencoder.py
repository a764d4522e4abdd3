"""fastgen.models.AutoEncoder: the deterministic baseline. Its codes have no prior.

Nothing in training ties the codes to any distribution, so `sample` (decoding
z ~ N(0, I), which is what one would try) lands wherever N(0, I) happens to fall
relative to the codes the decoder has seen; `latent_stats` shows how far the codes
are from N(0, I), and fastgen.models.sample_nn_mse measures how far such samples fall
from real images, next to a VAE's (see `fastgen train ae`).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from fastgen.models.networks import check_images, make_decoder, make_encoder

LOSSES = ("mse", "bce")


class AutoEncoder(nn.Module):
    """x -> z = encoder(x) -> x_hat = sigmoid(decoder(z)); loss per image summed over pixels.

    Args:
        image_shape: (C, H, W), values in [0, 1].
        latent_dim: code size.
        arch: "mlp" or "conv".
        loss: "mse" (squared error) or "bce" (binary cross-entropy on the logits).
    """

    def __init__(self, image_shape, latent_dim=16, arch="mlp", loss="mse"):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        self.config = dict(image_shape=tuple(image_shape), latent_dim=latent_dim, arch=arch, loss=loss)
        self.image_shape = tuple(image_shape)
        self.latent_dim = latent_dim
        self.loss_kind = loss
        self.encoder = make_encoder(arch, self.image_shape)
        self.code = nn.Linear(self.encoder.out_features, latent_dim)
        self.decoder = make_decoder(arch, latent_dim, self.image_shape)

    @property
    def num_dims(self):
        return math.prod(self.image_shape)

    def encode(self, x):
        check_images(x, self.image_shape)
        return self.code(self.encoder(x))

    def forward(self, x, generator=None):
        logits = self.decoder(self.encode(x))
        if self.loss_kind == "bce":
            per = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
        else:
            per = (torch.sigmoid(logits) - x).square()
        per = per.flatten(1).sum(1)
        return dict(loss=per.mean(), recon=per)

    @torch.no_grad()
    def decode_mean(self, z):
        return torch.sigmoid(self.decoder(z))

    encode_mean = encode

    @torch.no_grad()
    def reconstruct(self, x):
        return self.decode_mean(self.encode(x))

    @torch.no_grad()
    def sample(self, n, generator=None, device=None):
        """Decodes z ~ N(0, I). The AE never fit its codes to any prior: this is the
        naive thing to try, kept to show that it fails where a VAE's samples do not."""
        device = device or next(self.parameters()).device
        return self.decode_mean(torch.randn(n, self.latent_dim, generator=generator, device=device))

    @torch.no_grad()
    def latent_stats(self, x):
        """How far the codes of x are from N(0, I): mean |mean| and mean std per dim, and
        the mean squared norm per dim (1 for N(0, I))."""
        z = self.encode(x)
        return dict(code_abs_mean=float(z.mean(0).abs().mean()), code_std=float(z.std(0).mean()),
                    code_sq_norm_per_dim=float(z.square().mean()))

    @torch.no_grad()
    def interpolate(self, x_a, x_b, steps=8):
        za, zb = self.encode(x_a), self.encode(x_b)
        t = torch.linspace(0, 1, steps, device=za.device).view(1, steps, 1)
        z = (za[:, None] * (1 - t) + zb[:, None] * t).reshape(-1, za.shape[1])
        return self.decode_mean(z).view(za.shape[0], steps, *self.image_shape)
