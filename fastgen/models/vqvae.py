"""fastgen.models.VQVAE: conv encoder -> a quantizer (VectorQuantizer, FSQ or LFQ) -> conv decoder
(van den Oord et al. 2017).

    L = ||x_hat - x||^2 + beta * ||z_e - sg(z_q)||^2 + ||sg(z_e) - z_q||^2

with the squared error a mean over pixels and the two VQ terms means over code
elements (the codebook term is 0 with EMA codes, the default). Images in [0, 1] are
centred (x - 0.5) on the way in and shifted back on the way out. The encoder halves
the resolution log2(downsample) times with stride-2 4x4 convolutions, then runs
residual blocks; the decoder mirrors it with transposed convolutions. A PixelCNN prior
over the (H / downsample, W / downsample) code maps (fastgen.models.pixelcnn) turns
it into a generative model.
"""
import math

import torch

from fastgen.models.networks import check_images
import torch.nn.functional as F
from torch import nn

from fastgen.nn.quantizers import group_dim, make_quantizer, quantizer_shape


class ResidualBlock(nn.Module):
    """x + conv1x1(relu(conv3x3(relu(x)))), as in the VQ-VAE paper."""

    def __init__(self, channels, hidden):
        super().__init__()
        self.net = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, hidden, 3, padding=1),
                                 nn.ReLU(), nn.Conv2d(hidden, channels, 1))

    def forward(self, x):
        return x + self.net(x)


def default_commitment(quantizer, commitment):
    """The commitment weight a config means: as given, or by default 0.25 (a codebook's
    beta) and 0 for lfq (vector-quantize-pytorch's LFQ default; see VQVAE)."""
    if commitment is None:
        return 0.0 if quantizer == "lfq" else 0.25
    return float(commitment)


def _levels(downsample):
    if isinstance(downsample, bool) or not isinstance(downsample, int) or downsample < 1 \
            or downsample & (downsample - 1):
        raise ValueError(f"downsample must be a power of two (1, 2, 4, 8, ...), got {downsample!r}")
    return int(math.log2(downsample))


class VQVAE(nn.Module):
    """Vector-quantized autoencoder.

    Args:
        image_shape: (C, H, W), values in [0, 1]; H and W divisible by `downsample`.
        downsample: spatial reduction from image to code map (a power of two).
        hidden, res_hidden, num_res_blocks: widths and depth of encoder and decoder.
        num_codes, code_dim: codebook size K and code dimension D (quantizer "vq").
        commitment, ema, decay, kmeans_init, dead_code_threshold: the VectorQuantizer's
            (commitment is LFQ's commitment weight too). commitment None: 0.25 for a
            codebook (the VQ-VAE paper's beta), 0 for lfq (vector-quantize-pytorch's LFQ
            default; with 0.25 the commitment pins channels whose sign never changes at
            +-1 and they stay dead: 16 of 64 codes used on digits, against 64 of 64 at 0).
        quantizer: "vq" (VectorQuantizer), "simvq" (VectorQuantizer(simvq=True)), "fsq" (FSQ(levels): num_codes = prod(levels),
            code_dim = len(levels)) or "lfq" (LFQ: num_codes a power of two, code_dim =
            log2(num_codes)); fastgen/nn/quantizers.py states what any of them provides.
        levels: FSQ's levels per channel.
        rotation_trick: the VectorQuantizer's gradient estimator (quantizer "vq" or "simvq").
        stages: > 1 quantizes residually (ResidualVQ / ResidualFSQ / ResidualLFQ): S codes
            per position, coarse to fine.
        groups: > 1 splits the code's channels into G heads sharing one quantizer
            (code_dim is the total for vq; fsq / lfq give each head their own shape).
            With S stages or G groups the code map the priors see is (h, w * S): each
            position's codes side by side along its row, so raster order visits a
            position's codes together (stage or head order) and every prior, sampler
            and the transformer work unchanged.
    """

    def __init__(self, image_shape, downsample=2, hidden=64, res_hidden=32, num_res_blocks=2, num_codes=64,
                 code_dim=16, commitment=None, ema=True, decay=0.99, kmeans_init=True, dead_code_threshold=20,
                 quantizer="vq", levels=None, rotation_trick=False, entropy_weight=0.1, stages=1, groups=1):
        super().__init__()
        num_codes, code_dim = quantizer_shape(quantizer, num_codes, code_dim, levels)
        commitment = default_commitment(quantizer, commitment)
        if groups > 1:
            code_dim = group_dim(quantizer, code_dim, levels, num_codes, groups)
        c, h, w = image_shape
        steps = _levels(downsample)
        if h % downsample or w % downsample:
            raise ValueError(f"image_shape {tuple(image_shape)}: H and W must be divisible by "
                             f"downsample={downsample}")
        self.config = dict(image_shape=tuple(image_shape), downsample=downsample, hidden=hidden,
                           res_hidden=res_hidden, num_res_blocks=num_res_blocks, num_codes=num_codes,
                           code_dim=code_dim, commitment=commitment, ema=ema, decay=decay,
                           kmeans_init=kmeans_init, dead_code_threshold=dead_code_threshold, quantizer=quantizer,
                           levels=None if levels is None else list(levels), rotation_trick=rotation_trick,
                           entropy_weight=float(entropy_weight),
                           # only when not 1: older checkpoints keep their configs
                           **({"stages": stages} if stages != 1 else {}), **({"groups": groups} if groups != 1 else {}))
        self.image_shape = tuple(image_shape)
        self.depth = max(stages, groups)               # codes per position
        self.map_shape = (h // downsample, w // downsample)
        self.code_shape = (self.map_shape[0], self.map_shape[1] * self.depth)
        self.num_codes = num_codes

        enc, ch = [], c
        for i in range(steps):
            nxt = hidden if i == steps - 1 else max(hidden // 2, 1)
            enc += [nn.Conv2d(ch, nxt, 4, stride=2, padding=1), nn.ReLU()]
            ch = nxt
        enc += [nn.Conv2d(ch, hidden, 3, padding=1)]
        enc += [ResidualBlock(hidden, res_hidden) for _ in range(num_res_blocks)]
        enc += [nn.ReLU(), nn.Conv2d(hidden, code_dim, 1)]
        self.encoder = nn.Sequential(*enc)

        self.quantizer = make_quantizer(quantizer, num_codes=num_codes, code_dim=code_dim, levels=levels,
                                        commitment=commitment, ema=ema, decay=decay, kmeans_init=kmeans_init,
                                        dead_code_threshold=dead_code_threshold, rotation_trick=rotation_trick,
                                        entropy_weight=entropy_weight, channel_last=False, stages=stages,
                                        groups=groups)

        dec = [nn.Conv2d(code_dim, hidden, 3, padding=1)]
        dec += [ResidualBlock(hidden, res_hidden) for _ in range(num_res_blocks)]
        dec += [nn.ReLU()]
        ch = hidden
        for i in range(steps):
            nxt = max(hidden // 2, 1)
            dec += [nn.ConvTranspose2d(ch, nxt, 4, stride=2, padding=1), nn.ReLU()]
            ch = nxt
        dec += [nn.Conv2d(ch, c, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)

    def _check(self, x):
        check_images(x, self.image_shape)

    def forward(self, x):
        """Training step: dict(loss, recon (B,) squared error per image (sum over pixels),
        commitment, codebook, perplexity, indices (B, h, w * depth))."""
        self._check(x)
        z_e = self.encoder(x - 0.5)
        vq = self.quantizer(z_e)
        x_hat = self.decoder(vq.quantized) + 0.5
        mse = F.mse_loss(x_hat, x)
        loss = mse + sum(vq.losses.values())
        recon = (x_hat.detach() - x).square().flatten(1).sum(1)
        zero = mse.new_zeros(())
        # every quantizer's loss terms, and commitment/codebook always (0 where it has none)
        terms = {"commitment": zero, "codebook": zero, **{k: v.detach() for k, v in vq.losses.items()}}
        return dict(loss=loss, mse=mse.detach(), recon=recon, **terms, perplexity=vq.perplexity,
                    indices=self._flat(vq.indices))

    @torch.no_grad()
    def encode(self, x):
        """Images -> code indices (B, h, w * depth) int64 (no codebook update, whatever the mode)."""
        self._check(x)
        was = self.quantizer.training
        self.quantizer.eval()
        try:
            return self._flat(self.quantizer(self.encoder(x - 0.5)).indices)
        finally:
            self.quantizer.train(was)

    def _flat(self, indices):
        """(B, h, w[, S]) quantizer indices -> the (B, h, w * S) code map priors model."""
        return indices if self.depth == 1 else indices.flatten(-2)

    @torch.no_grad()
    def decode(self, indices):
        """Code indices (B, h, w * depth) -> images (B, C, H, W) clamped to [0, 1]."""
        if not isinstance(indices, torch.Tensor) or tuple(indices.shape[1:]) != self.code_shape:
            raise ValueError(f"indices must be (B, {self.code_shape[0]}, {self.code_shape[1]}), "
                             f"got {tuple(getattr(indices, 'shape', ()))}")
        if self.depth > 1:
            indices = indices.unflatten(-1, (self.map_shape[1], self.depth))
        return (self.decoder(self.quantizer.decode_indices(indices)) + 0.5).clamp(0, 1)

    @torch.no_grad()
    def reconstruct(self, x):
        return self.decode(self.encode(x))
