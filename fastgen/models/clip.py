"""fastgen.models.ContrastiveScorer: a small CLIP-style image-text model (Radford et al.
2021, at toy scale) that scores how well an image matches a caption -- DALL-E re-ranks
its samples with CLIP; `fastgen sample transformer --rerank K --scorer CKPT` does the same
with one trained in the package on any captioned images.

Image encoder: a small conv net (two stride-2 stages, global average pool), or an MLP for
images too small to halve twice. Text encoder: byte embeddings + positions, a
bidirectional transformer layer, the mean over the caption's bytes (PAD excluded). Both
project to `dim` and are L2-normalised; similarity = cosine x a learnt temperature.

Loss: the symmetric InfoNCE of CLIP over a batch, except that every pair whose captions
are the same bytes, or whose images are the same pixels, counts as a positive (targets
spread evenly over them): with label-derived captions ("a seven") many images of a batch
share a caption, and one image comes with several phrasings; treating those as negatives
would push apart what should match.

Training rows are packed as [image pixels ; caption bytes] in one float tensor (the bytes
are small integers, exact in float32): `pack` / `unpack`.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from fastgen.models.transformer import PAD, TEXT_VOCAB, encode_captions


class ContrastiveScorer(nn.Module):
    """Args:
        image_shape: (C, H, W) of the images, values in [0, 1].
        text_tokens: caption length in bytes (longer captions are refused).
        dim: the shared embedding size; width: the encoders' channels.
    """

    def __init__(self, image_shape, text_tokens=64, dim=64, width=64, heads=4):
        super().__init__()
        if len(image_shape) != 3 or min(image_shape) < 1:
            raise ValueError(f"image_shape must be (C, H, W), got {image_shape}")
        if width % heads:
            raise ValueError(f"width ({width}) must be divisible by heads ({heads})")
        self.config = dict(image_shape=tuple(image_shape), text_tokens=text_tokens, dim=dim, width=width, heads=heads)
        self.image_shape, self.text_tokens = tuple(image_shape), text_tokens
        c, h, w = self.image_shape
        if min(h, w) >= 8:
            self.image_net = nn.Sequential(
                nn.Conv2d(c, width // 2, 3, padding=1), nn.GELU(),
                nn.Conv2d(width // 2, width, 3, stride=2, padding=1), nn.GELU(),
                nn.Conv2d(width, width, 3, stride=2, padding=1), nn.GELU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, dim))
        else:
            self.image_net = nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, 2 * width), nn.GELU(),
                                           nn.Linear(2 * width, dim))
        self.text_embed = nn.Embedding(TEXT_VOCAB, width)
        self.text_pos = nn.Parameter(torch.randn(text_tokens, width) * 0.02)
        self.text_net = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True,
                                                   norm_first=True)
        self.text_out = nn.Linear(width, dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        # a fixed random vector: equal images give bit-equal dot products with it (the
        # same-image positives); made once, not per step, and kept out of the state dict
        g = torch.Generator().manual_seed(12345)
        self.register_buffer("probe", torch.randn(c * h * w, generator=g), persistent=False)

    # -- inputs ---------------------------------------------------------------------------

    def _check_images(self, images):
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(f"images must be (N, {', '.join(map(str, self.image_shape))}), got "
                             f"{tuple(getattr(images, 'shape', ()))}")
        if not images.is_floating_point() or (images.numel() and not bool(torch.isfinite(images).all())):
            raise ValueError("images must be finite floating-point values in [0, 1]")

    def _check_text(self, text):
        if not isinstance(text, torch.Tensor) or text.dim() != 2 or text.shape[1] != self.text_tokens \
                or text.dtype.is_floating_point:
            raise ValueError(f"text must be integer (N, {self.text_tokens}) tokens (encode_captions), got "
                             f"{getattr(text, 'dtype', type(text).__name__)} {tuple(getattr(text, 'shape', ()))}")
        if text.numel() and (int(text.min()) < 0 or int(text.max()) >= TEXT_VOCAB):
            raise ValueError(f"text tokens must be in [0, {TEXT_VOCAB})")

    def tokens(self, captions):
        """List of str -> (N, text_tokens) tokens (ValueError for empty / too-long captions)."""
        return encode_captions(captions, self.text_tokens)

    def pack(self, images, text):
        self._check_images(images)
        self._check_text(text)
        dt = self.text_pos.dtype
        return torch.cat([images.flatten(1).to(dt), text.to(dt)], 1)

    def unpack(self, rows):
        d = math.prod(self.image_shape)
        if not isinstance(rows, torch.Tensor) or rows.dim() != 2 or rows.shape[1] != d + self.text_tokens:
            raise ValueError(f"packed rows must be (N, {d + self.text_tokens}) (pixels then caption bytes), got "
                             f"{tuple(getattr(rows, 'shape', ()))}")
        return rows[:, :d].reshape(-1, *self.image_shape), rows[:, d:].round().long()

    # -- embeddings -----------------------------------------------------------------------

    def embed_images(self, images):
        """(N, C, H, W) -> (N, dim), unit length."""
        self._check_images(images)
        return F.normalize(self.image_net(images.to(self.text_pos.dtype) * 2 - 1), dim=-1)

    def embed_text(self, text):
        """(N, text_tokens) tokens -> (N, dim), unit length."""
        self._check_text(text)
        pad = text == PAD
        x = self.text_net(self.text_embed(text) + self.text_pos, src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).float()
        x = (x * keep).sum(1) / keep.sum(1).clamp_min(1)
        return F.normalize(self.text_out(x), dim=-1)

    def similarity(self, images, text):
        """(N,) cosine similarity of each image with its own caption (the re-ranking score)."""
        return (self.embed_images(images) * self.embed_text(text)).sum(-1)

    def forward(self, images, text=None):
        """dict(loss = symmetric multi-positive InfoNCE over the batch, accuracy = the share
        of images whose most similar caption in the batch is one of theirs). With text=None,
        `images` holds packed rows (what training iterates over)."""
        if text is None:
            images, text = self.unpack(images)
        if images.shape[0] != text.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {text.shape[0]} captions")
        zi, zt = self.embed_images(images), self.embed_text(text)
        logits = self.logit_scale.clamp(max=math.log(100)).exp() * zi @ zt.T
        # positives: pairs with the same caption, or the same image (an image with several
        # phrasings appears once per phrasing); images compared by an exact fingerprint
        key = images.flatten(1).to(self.probe.dtype) @ self.probe
        same = ((text[:, None, :] == text[None, :, :]).all(-1) | (key[:, None] == key[None, :])).float()
        target = same / same.sum(1, keepdim=True)
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
        hit = same.gather(1, logits.argmax(1, keepdim=True))[:, 0]
        return dict(loss=loss, accuracy=hit.mean().detach())
