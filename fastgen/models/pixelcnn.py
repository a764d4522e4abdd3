"""fastgen.models.GatedPixelCNN: an autoregressive prior over discrete code maps
(van den Oord et al. 2016, "Conditional Image Generation with PixelCNN Decoders").

p(c) = prod_{i,j} p(c_ij | c_<ij) in raster order (rows top to bottom, left to right).
Each gated layer has a vertical stack (everything in the rows above) and a horizontal
stack (the pixels to the left in the current row, plus the vertical stack), which
together see the whole causal past with no blind spot. Causality is built in by
padding and cropping instead of masked weights:

- vertical: a (k//2 + 1, k) kernel over rows padded on top only, so output row i sees
  rows <= i of its input; the first layer also shifts its input down one row, so the
  vertical features at row i depend only on code rows < i;
- horizontal: a (1, k//2 + 1) kernel padded on the left only; the first layer shifts by
  one column (and has no residual connection), so position (i, j) never sees c_ij.

Because row i depends only on rows <= i, sampling row i runs the network on rows 0..i
only (the rows below would be discarded anyway).
"""
import torch
import torch.nn.functional as F
from torch import nn


def _gate(t):
    a, b = t.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class GatedLayer(nn.Module):
    def __init__(self, dim, kernel, first, num_classes=None):
        super().__init__()
        self.dim, self.half, self.first = dim, kernel // 2, first
        self.v_conv = nn.Conv2d(dim, 2 * dim, (self.half + 1, kernel))
        self.v_to_h = nn.Conv2d(2 * dim, 2 * dim, 1)
        self.h_conv = nn.Conv2d(dim, 2 * dim, (1, self.half + 1))
        self.h_out = nn.Conv2d(dim, dim, 1)
        self.cond = nn.Embedding(num_classes, 4 * dim) if num_classes else None

    def forward(self, v, h, labels=None):
        H, W = v.shape[-2:]
        s = int(self.first)   # the first layer's shift: strictly above / strictly left
        v_in = F.pad(v, (self.half, self.half, self.half + s, 0))[:, :, :H + self.half]
        h_in = F.pad(h, (self.half + s, 0, 0, 0))[:, :, :, :W + self.half]
        v_feat = self.v_conv(v_in)
        h_feat = self.h_conv(h_in) + self.v_to_h(v_feat)
        if self.cond is not None:
            cv, ch = self.cond(labels)[:, :, None, None].chunk(2, dim=1)
            v_feat, h_feat = v_feat + cv, h_feat + ch
        h_new = self.h_out(_gate(h_feat))
        if not self.first:   # the first layer's h input holds the current position itself
            h_new = h_new + h
        return _gate(v_feat), h_new


class GatedPixelCNN(nn.Module):
    """Prior over (B, H, W) maps of codes in [0, num_codes).

    Args:
        num_codes: code vocabulary K.
        code_shape: (H, W) of the maps (kept in the config; any size works).
        dim: channels of the stacks; layers: gated layers; kernel: odd kernel width.
        num_classes: enables class conditioning (labels (B,) in [0, num_classes)).
    """

    def __init__(self, num_codes, code_shape, dim=64, layers=6, kernel=3, num_classes=None):
        super().__init__()
        if kernel < 3 or kernel % 2 == 0:
            raise ValueError(f"kernel must be an odd number >= 3, got {kernel}")
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        self.config = dict(num_codes=num_codes, code_shape=tuple(code_shape), dim=dim, layers=layers,
                           kernel=kernel, num_classes=num_classes)
        self.num_codes, self.code_shape, self.num_classes = num_codes, tuple(code_shape), num_classes
        self.embed = nn.Embedding(num_codes, dim)
        self.layers = nn.ModuleList(GatedLayer(dim, kernel, first=(i == 0), num_classes=num_classes)
                                    for i in range(layers))
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(dim, dim, 1), nn.ReLU(), nn.Conv2d(dim, num_codes, 1))

    def _check(self, codes, labels):
        if not isinstance(codes, torch.Tensor) or codes.dim() != 3 or codes.dtype.is_floating_point:
            raise ValueError(f"codes must be an integer (B, H, W) tensor, got "
                             f"{getattr(codes, 'dtype', type(codes))} {tuple(getattr(codes, 'shape', ()))}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.num_codes):
            raise ValueError(f"codes must be in [0, {self.num_codes}), got [{int(codes.min())}, {int(codes.max())}]")
        if (labels is None) != (self.num_classes is None):
            raise ValueError("labels are required for a class-conditional model (num_classes set) and "
                             "not accepted otherwise")
        if labels is not None and (labels.shape != (codes.shape[0],) or int(labels.min()) < 0
                                   or int(labels.max()) >= self.num_classes):
            raise ValueError(f"labels must be ({codes.shape[0]},) in [0, {self.num_classes})")

    def logits(self, codes, labels=None):
        """(B, H, W) codes -> (B, K, H, W) logits of p(c_ij | c_<ij)."""
        self._check(codes, labels)
        x = self.embed(codes.long()).permute(0, 3, 1, 2)
        v = h = x
        for layer in self.layers:
            v, h = layer(v, h, labels)
        return self.head(h)

    def forward(self, codes, labels=None):
        """dict(loss = mean cross-entropy in nats per code, nll (B,) nats per map)."""
        logits = self.logits(codes, labels)
        ce = F.cross_entropy(logits, codes.long(), reduction="none")
        return dict(loss=ce.mean(), nll=ce.detach().flatten(1).sum(1))

    @torch.no_grad()
    def sample(self, n, labels=None, generator=None, device=None, temperature=1.0, shape=None):
        """n code maps drawn position by position; row i reruns the net on rows 0..i only."""
        device = device or self.embed.weight.device
        H, W = shape or self.code_shape
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        codes = torch.zeros(n, H, W, dtype=torch.long, device=device)
        for i in range(H):
            for j in range(W):
                logits = self.logits(codes[:, :i + 1], labels)[:, :, i, j]
                probs = torch.softmax(logits.float() / temperature, dim=1)
                codes[:, i, j] = torch.multinomial(probs, 1, generator=generator)[:, 0]
        return codes
