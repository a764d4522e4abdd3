"""fastgen.models.VQVAE2: a two-level VQ-VAE (Razavi et al. 2019) and its two priors.

    x --enc_b (/4)--> h_b --enc_t (/2)--> h_t --1x1--> VQ_t --> q_t (top codes, /8)
    q_t --dec_t (x2)--> d_t;  [d_t, h_b] --1x1--> VQ_b --> q_b (bottom codes, /4)
    [upsample(q_t), q_b] --dec (x4)--> x_hat

    L = ||x_hat - x||^2 + the two quantizers' commitment (and codebook) terms

The top codes hold the global layout, the bottom codes the detail given it. Two
`VectorQuantizer`s, EMA codes (decay 0.99), 512 codes of dimension 64 by default (the
best-known public implementation's choice). What the top level alone carries is shown
by decoding an image's top codes with bottom codes drawn by the bottom prior given them
(`fastgen sample vqvae2 --reconstruct`): zeroing the bottom codes instead gives a blank,
as the decoder reads the detail from them.

Priors (`fastgen.models.pixelcnn.GatedPixelCNN`, sampled incrementally):
    TopPrior    = a GatedPixelCNN over the top maps (optionally class-conditional)
    BottomPrior = a GatedPixelCNN over the bottom maps conditioned on the top codes:
                  embedded, upsampled x2 by a transposed convolution, added at every
                  position through the gated layers' 1x1 map terms.
Sampling: top prior -> bottom prior (given the top codes) -> decoder.
The public implementation's top prior has attention: here an option (`attention=True`,
`fastgen train prior --level top --attention`), sampled incrementally as well.
"""
import torch
import torch.nn.functional as F
from torch import nn

from fastgen.models.networks import check_images
from fastgen.models.pixelcnn import GatedPixelCNN
from fastgen.models.vqvae import ResidualBlock, default_commitment
from fastgen.nn.quantizers import make_quantizer, quantizer_shape


def _encoder(cin, hidden, res_hidden, blocks, stride):
    half = max(hidden // 2, 1)
    if stride == 4:
        layers = [nn.Conv2d(cin, half, 4, 2, 1), nn.ReLU(), nn.Conv2d(half, hidden, 4, 2, 1), nn.ReLU(),
                  nn.Conv2d(hidden, hidden, 3, padding=1)]
    else:
        layers = [nn.Conv2d(cin, half, 4, 2, 1), nn.ReLU(), nn.Conv2d(half, hidden, 3, padding=1)]
    layers += [ResidualBlock(hidden, res_hidden) for _ in range(blocks)] + [nn.ReLU()]
    return nn.Sequential(*layers)


def _decoder(cin, cout, hidden, res_hidden, blocks, stride):
    layers = [nn.Conv2d(cin, hidden, 3, padding=1)]
    layers += [ResidualBlock(hidden, res_hidden) for _ in range(blocks)] + [nn.ReLU()]
    if stride == 4:
        half = max(hidden // 2, 1)
        layers += [nn.ConvTranspose2d(hidden, half, 4, 2, 1), nn.ReLU(), nn.ConvTranspose2d(half, cout, 4, 2, 1)]
    else:
        layers += [nn.ConvTranspose2d(hidden, cout, 4, 2, 1)]
    return nn.Sequential(*layers)


class VQVAE2(nn.Module):
    """Two-level VQ-VAE.

    Args:
        image_shape: (C, H, W) in [0, 1], H and W divisible by 8.
        hidden, res_hidden, num_res_blocks: widths and depth of encoders and decoders.
        num_codes, code_dim: each codebook's size and code dimension (both levels).
        commitment, ema, decay, kmeans_init, dead_code_threshold: the VectorQuantizers'
            (commitment None: 0.25, or 0 for lfq, as VQVAE).
        quantizer, levels, rotation_trick: as in VQVAE (fastgen/nn/quantizers.py), the
            same kind at both levels.
    """

    def __init__(self, image_shape, hidden=128, res_hidden=64, num_res_blocks=2, num_codes=512, code_dim=64,
                 commitment=None, ema=True, decay=0.99, kmeans_init=True, dead_code_threshold=20, quantizer="vq",
                 levels=None, rotation_trick=False, entropy_weight=0.1):
        super().__init__()
        num_codes, code_dim = quantizer_shape(quantizer, num_codes, code_dim, levels)
        commitment = default_commitment(quantizer, commitment)
        c, h, w = image_shape
        if h % 8 or w % 8:
            raise ValueError(f"image_shape {tuple(image_shape)}: H and W must be divisible by 8 "
                             "(bottom codes at 1/4, top codes at 1/8)")
        self.config = dict(image_shape=tuple(image_shape), hidden=hidden, res_hidden=res_hidden,
                           num_res_blocks=num_res_blocks, num_codes=num_codes, code_dim=code_dim,
                           commitment=commitment, ema=ema, decay=decay, kmeans_init=kmeans_init,
                           dead_code_threshold=dead_code_threshold, quantizer=quantizer,
                           levels=None if levels is None else list(levels), rotation_trick=rotation_trick,
                           entropy_weight=float(entropy_weight))
        self.image_shape = tuple(image_shape)
        self.num_codes = num_codes
        self.top_shape, self.bottom_shape = (h // 8, w // 8), (h // 4, w // 4)
        vq = dict(num_codes=num_codes, code_dim=code_dim, levels=levels, commitment=commitment, ema=ema,
                  decay=decay, kmeans_init=kmeans_init, dead_code_threshold=dead_code_threshold,
                  rotation_trick=rotation_trick, entropy_weight=entropy_weight, channel_last=False)
        self.enc_b = _encoder(c, hidden, res_hidden, num_res_blocks, 4)
        self.enc_t = _encoder(hidden, hidden, res_hidden, num_res_blocks, 2)
        self.pre_t = nn.Conv2d(hidden, code_dim, 1)
        self.vq_t = make_quantizer(quantizer, **vq)
        self.dec_t = _decoder(code_dim, code_dim, hidden, res_hidden, num_res_blocks, 2)
        self.pre_b = nn.Conv2d(code_dim + hidden, code_dim, 1)
        self.vq_b = make_quantizer(quantizer, **vq)
        self.up_t = nn.ConvTranspose2d(code_dim, code_dim, 4, 2, 1)
        self.dec = _decoder(2 * code_dim, c, hidden, res_hidden, num_res_blocks, 4)

    def _quantize(self, x):
        h_b = self.enc_b(x - 0.5)
        vt = self.vq_t(self.pre_t(self.enc_t(h_b)))
        vb = self.vq_b(self.pre_b(torch.cat([self.dec_t(vt.quantized), h_b], 1)))
        return vt, vb

    def _decode_q(self, q_t, q_b):
        return self.dec(torch.cat([self.up_t(q_t), q_b], 1)) + 0.5

    def forward(self, x):
        """Training step: dict(loss, mse, recon (B,) squared error per image, commitment,
        perplexity_top, perplexity_bottom, top (B, h/8, w/8), bottom (B, h/4, w/4))."""
        check_images(x, self.image_shape)
        vt, vb = self._quantize(x)
        x_hat = self._decode_q(vt.quantized, vb.quantized)
        mse = F.mse_loss(x_hat, x)
        vq_loss = sum(sum(v.losses.values(), mse.new_zeros(())) for v in (vt, vb))   # every quantizer's terms
        recon = (x_hat.detach() - x).square().flatten(1).sum(1)
        return dict(loss=mse + vq_loss, mse=mse.detach(), recon=recon, commitment=vq_loss.detach(),
                    perplexity_top=vt.perplexity, perplexity_bottom=vb.perplexity, top=vt.indices, bottom=vb.indices)

    @torch.no_grad()
    def encode(self, x):
        """Images -> (top (B, H/8, W/8), bottom (B, H/4, W/4)) int64 codes (no codebook update)."""
        check_images(x, self.image_shape)
        modes = self.vq_t.training, self.vq_b.training
        self.vq_t.eval(), self.vq_b.eval()
        try:
            vt, vb = self._quantize(x)
            return vt.indices, vb.indices
        finally:
            self.vq_t.train(modes[0]), self.vq_b.train(modes[1])

    def _check_codes(self, codes, shape, name):
        if not isinstance(codes, torch.Tensor) or codes.dim() != 3 or tuple(codes.shape[1:]) != shape \
                or codes.dtype.is_floating_point:
            raise ValueError(f"{name} codes must be an integer (B, {shape[0]}, {shape[1]}) tensor, got "
                             f"{getattr(codes, 'dtype', type(codes).__name__)} {tuple(getattr(codes, 'shape', ()))}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.num_codes):
            raise ValueError(f"{name} codes must be in [0, {self.num_codes})")

    @torch.no_grad()
    def decode(self, top, bottom):
        """Codes -> images (B, C, H, W) in [0, 1]."""
        self._check_codes(top, self.top_shape, "top")
        self._check_codes(bottom, self.bottom_shape, "bottom")
        if bottom.shape[0] != top.shape[0]:
            raise ValueError(f"top has {top.shape[0]} maps but bottom has {bottom.shape[0]}")
        return self._decode_q(self.vq_t.decode_indices(top), self.vq_b.decode_indices(bottom)).clamp(0, 1)

    @torch.no_grad()
    def reconstruct(self, x):
        return self.decode(*self.encode(x))


class _CondBlock(nn.Module):
    """A residual block of the conditioning stack (the top codes are known in full when the
    bottom map is drawn, so these convolutions look everywhere: no causal masking)."""

    def __init__(self, dim):
        super().__init__()
        self.net = nn.Sequential(nn.ReLU(), nn.Conv2d(dim, dim, 3, padding=1), nn.ReLU(), nn.Conv2d(dim, dim, 1))

    def forward(self, x):
        return x + self.net(x)


class BottomPrior(nn.Module):
    """p(bottom | top): a GatedPixelCNN over the bottom maps whose gated layers read the
    top codes, embedded, passed through `cond_blocks` residual blocks (the conditioning
    stack of PixelSNAIL's bottom prior: each bottom position reads a wide window of the top
    map, not only the code above it) and upsampled x2 (a 1x1 term per position per layer).
    attention / dropout: as GatedPixelCNN's."""

    def __init__(self, num_codes, code_shape, dim=64, layers=6, kernel=3, cond_dim=32, cond_blocks=0,
                 attention=False, dropout=0.0):
        super().__init__()
        if cond_blocks < 0:
            raise ValueError(f"cond_blocks must be >= 0, got {cond_blocks}")
        self.config = dict(num_codes=num_codes, code_shape=tuple(code_shape), dim=dim, layers=layers,
                           kernel=kernel, cond_dim=cond_dim,
                           # only the keys that differ from the defaults: older checkpoints load as they were
                           **({"cond_blocks": cond_blocks} if cond_blocks else {}),
                           **({"attention": attention} if attention else {}),
                           **({"dropout": dropout} if dropout else {}))
        self.num_codes, self.code_shape = num_codes, tuple(code_shape)
        self.top_shape = (code_shape[0] // 2, code_shape[1] // 2)
        self.embed_top = nn.Embedding(num_codes, cond_dim)
        self.cond_stack = nn.Sequential(*[_CondBlock(cond_dim) for _ in range(cond_blocks)])
        self.up = nn.Sequential(nn.ConvTranspose2d(cond_dim, cond_dim, 4, 2, 1), nn.ReLU(),
                                nn.Conv2d(cond_dim, cond_dim, 3, padding=1))
        self.pixelcnn = GatedPixelCNN(num_codes, code_shape, dim, layers, kernel, cond_channels=cond_dim,
                                      attention=attention, dropout=dropout)

    def condition(self, top):
        if not isinstance(top, torch.Tensor) or top.dim() != 3 or tuple(top.shape[1:]) != self.top_shape:
            raise ValueError(f"top codes must be (B, {self.top_shape[0]}, {self.top_shape[1]}), got "
                             f"{tuple(getattr(top, 'shape', ()))}")
        return self.up(self.cond_stack(self.embed_top(top.long()).permute(0, 3, 1, 2)))

    def forward(self, bottom, top=None):
        """dict(loss, nll) of bottom (B, h, w) given top (B, h/2, w/2); or, with top=None,
        of packed rows (B, h*w + h*w/4) = pack(bottom, top) -- what training iterates over."""
        if top is None:
            bottom, top = self.unpack(bottom)
        return self.pixelcnn(bottom, cond=self.condition(top))

    def pack(self, bottom, top):
        return torch.cat([bottom.flatten(1), top.flatten(1)], 1)

    def unpack(self, rows):
        n = self.code_shape[0] * self.code_shape[1]
        if not isinstance(rows, torch.Tensor) or rows.dim() != 2 or rows.shape[1] != n + n // 4:
            raise ValueError(f"packed rows must be (B, {n + n // 4}) (bottom codes then top codes), got "
                             f"{tuple(getattr(rows, 'shape', ()))}")
        return rows[:, :n].reshape(-1, *self.code_shape), rows[:, n:].reshape(-1, *self.top_shape)

    @torch.no_grad()
    def sample(self, top, generator=None, temperature=1.0, naive=False):
        f = self.pixelcnn.sample_naive if naive else self.pixelcnn.sample
        return f(top.shape[0], generator=generator, device=top.device, temperature=temperature,
                 cond=self.condition(top))


def TopPrior(num_codes, code_shape, dim=64, layers=6, kernel=3, num_classes=None, attention=False, dropout=0.0):
    """p(top): a GatedPixelCNN over the top maps; attention=True adds causal self-attention
    over the raster order before the head, attention="every" after every gated layer (the
    public implementation's top prior has attention in every block)."""
    return GatedPixelCNN(num_codes, code_shape, dim, layers, kernel, num_classes=num_classes, attention=attention,
                         dropout=dropout)
