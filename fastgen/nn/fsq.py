"""Finite scalar quantization (Mentzer et al., ICLR 2024): no codebook, no search.

Each of the d = len(levels) channels is bounded to (-(L_i - 1) / 2, (L_i - 1) / 2) (shifted
by half a step for even L_i so that the rounding grid is symmetric), rounded to the
nearest of its L_i integers with a straight-through gradient, and scaled to [-1, 1]. The
implicit codebook is the product grid: prod(L_i) codes, every one reachable, so no code
can die and there is no commitment or codebook loss. The paper's level choices: 2^8
[8, 6, 5], 2^10 [8, 5, 5, 5], 2^12 [7, 5, 5, 5, 5], 2^14 [8, 8, 8, 6, 5], 2^16
[8, 8, 8, 5, 5, 5].
"""
import math

import torch
from torch import nn

from fastgen.nn.vector_quantizer import VQOutput, _check_code_indices, _code_usage_perplexity, _from_rows, _to_rows

# The bound's half range is (L - 1)(1 + eps) / 2, as in vector-quantize-pytorch (the same
# codes as that package's FSQ): the outermost codes are reached at finite inputs, and two
# levels work. The paper's appendix code uses (1 - eps) (and tan for the shift, where
# atanh is the inverse it means); the two choices differ on about 1 % of random inputs.
_EPS = 1e-3


class _BoundRound(torch.autograd.Function):
    """(codes, rounded) of bound(z), with the straight-through gradient of bound:
    d codes / d z = (1 - tanh^2) half_l / half_width. One saved tensor and three
    elementwise passes back, where autograd's chain of the same formula keeps five
    (measured: the FSQ step at 0.78-0.87 of vector-quantize-pytorch's speed before)."""

    @staticmethod
    def forward(ctx, z, shift, half_l, offset, half_width):
        t = torch.tanh(z + shift)
        rounded = torch.addcmul(-offset, t, half_l).round_()
        ctx.save_for_backward(t, half_l / half_width)
        ctx.mark_non_differentiable(rounded)
        return rounded / half_width, rounded

    @staticmethod
    def backward(ctx, grad, _):
        t, scale = ctx.saved_tensors
        return torch.addcmul(scale, t * t, -scale).mul_(grad), None, None, None, None


class FSQ(nn.Module):
    """FSQ(levels): quantize d = len(levels) channels to levels[i] values each.

    forward(x) -> VQOutput(quantized in [-1, 1] with straight-through gradients, indices
    int64 in [0, prod(levels)), losses {} (FSQ needs none), perplexity of the batch's code
    usage). x: (..., d) with channel_last=True, or (B, d, ...) with channel_last=False;
    float32/float16/bfloat16 (computed in float32, returned in x's dtype).
    decode_indices(indices) -> the quantized vectors (..., d) of those codes.
    No state: nothing to synchronise under DDP.
    """

    def __init__(self, levels, *, channel_last=True):
        super().__init__()
        levels = list(levels) if not isinstance(levels, int) else [levels]
        if not levels or any(isinstance(v, bool) or not isinstance(v, int) or v < 2 for v in levels):
            raise ValueError(f"levels must be a non-empty list of ints >= 2, got {levels!r}")
        self.levels = levels
        self.dim = len(levels)
        self.num_codes = math.prod(levels)
        self.channel_last = bool(channel_last)
        lv = torch.tensor(levels, dtype=torch.float32)
        self.register_buffer("_levels", lv, persistent=False)
        # digit i of an index has weight prod(levels[:i])
        basis = torch.cumprod(torch.tensor([1] + levels[:-1], dtype=torch.long), 0)
        self.register_buffer("_basis", basis, persistent=False)

    def extra_repr(self):
        return f"levels={self.levels}, num_codes={self.num_codes}, channel_last={self.channel_last}"

    def bound(self, z):
        """(N, d) float32 -> each channel squashed into its levels' range (before rounding)."""
        half_l, offset, shift = self._bound_constants()
        return torch.tanh(z + shift) * half_l - offset

    def _bound_constants(self):
        half_l = (self._levels - 1) * (1 + _EPS) / 2
        offset = torch.where(self._levels % 2 == 0, 0.5, 0.0)
        return half_l, offset, torch.atanh(offset / half_l)

    def forward(self, x):
        rows, lead = _to_rows(x, self.dim, self.channel_last)
        z = rows.float()
        # NaN propagates through min and max: one reduction, no (N, d) bool temporary
        if z.numel() and not bool(torch.isfinite(torch.stack(torch.aminmax(z))).all()):
            raise ValueError("x has non-finite values (NaN or inf)")
        half_l, offset, shift = self._bound_constants()
        half_width = torch.div(self._levels, 2, rounding_mode="floor")
        codes, rounded = _BoundRound.apply(z, shift, half_l, offset, half_width)
        indices = self._indices(rounded, half_width)
        out = _from_rows(codes, lead, x.dtype, self.channel_last)
        return VQOutput(out, indices.view(lead), {}, _code_usage_perplexity(indices, self.num_codes))

    def _indices(self, rounded, half_width):
        digits = (rounded + half_width).long()          # 0 .. L_i - 1 per channel
        return (digits * self._basis).sum(-1)

    def decode_indices(self, indices):
        """int64 indices (any shape) -> their codes, (*shape, d) float32 in [-1, 1]
        (as forward returns them: channel dim second with channel_last=False)."""
        _check_code_indices(indices, self.num_codes)
        levels = self._levels.long()
        digits = (indices.unsqueeze(-1) // self._basis) % levels
        half_width = torch.div(self._levels, 2, rounding_mode="floor")
        codes = (digits.float() - half_width) / half_width
        return codes if self.channel_last else codes.movedim(-1, 1)
