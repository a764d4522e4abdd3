"""Residual quantization with any quantizer of the contract (fastgen/nn/quantizers.py):
stage s quantizes what stages 0..s-1 left over; the output is the sum of the stages.

`ResidualFSQ(levels, num_quantizers)`: stage s is FSQ(levels) on the residual divided by
levels^-s per channel (the result multiplied back), so each stage refines the last one's
grid by a factor of L_i -- vector-quantize-pytorch's scales, but its ResidualFSQ runs its
symmetry-preserving FSQ variant in each stage where these run the paper's FSQ, so the
codes differ. `ResidualLFQ(dim, num_quantizers)`: stage s is LFQ(dim, codebook_scale=2^-s),
the same codes as that package's ResidualLFQ (tested). (`fastgen.nn.ResidualVQ` is the learned-codebook version.)

Gradients: each stage's own estimator (FSQ's straight-through rounding, LFQ's), the
residual passed on detached from the stage's output, as in the peer.
"""

import torch
from torch import nn

from fastgen.nn.fsq import FSQ
from fastgen.nn.lfq import LFQ
from fastgen.nn.vector_quantizer import VQOutput, _check_int, _from_rows, _to_rows


class ResidualQuantizer(nn.Module):
    """Stages (channel-last quantizers of one `dim`) on successive residuals, stage s
    seeing residual / scales[s] and its output multiplied by scales[s].

    forward(x) -> VQOutput(sum of the stages, indices (..., Q), losses summed over stages
    per name, mean perplexity). decode_indices((..., Q)) -> the sum of the stages' codes,
    as forward returns it. num_codes: per stage (indices[..., s] in [0, num_codes))."""

    def __init__(self, stages, scales, *, channel_last=True):
        super().__init__()
        stages = list(stages)
        if not stages:
            raise ValueError("stages must hold at least one quantizer")
        dims = {s.dim for s in stages}
        if len(dims) != 1 or len({s.num_codes for s in stages}) != 1:
            raise ValueError("every stage must quantize the same dim with the same number of codes")
        if any(not s.channel_last for s in stages):
            raise ValueError("stages must be channel-last (this module handles the layout)")
        self.stages = nn.ModuleList(stages)
        self.dim, self.num_codes, self.num_quantizers = dims.pop(), stages[0].num_codes, len(stages)
        scales = torch.as_tensor(scales, dtype=torch.float32)
        if scales.shape not in ((len(stages),), (len(stages), self.dim)):
            raise ValueError(f"scales must be (Q,) or (Q, dim), got shape {tuple(scales.shape)}")
        if not bool(torch.isfinite(scales).all()) or not bool((scales > 0).all()):
            raise ValueError("scales must be finite and > 0 (each stage divides its residual by them)")
        self.register_buffer("scales", scales.reshape(len(stages), -1).expand(len(stages), self.dim).clone(),
                             persistent=False)
        self.channel_last = bool(channel_last)

    def forward(self, x):
        rows, lead = _to_rows(x, self.dim, self.channel_last)
        z = rows.float()
        residual, total = z, 0
        indices, perps, losses = [], [], {}
        for stage, scale in zip(self.stages, self.scales):
            q, idx, stage_losses, perp = stage(residual / scale)
            q = q * scale
            residual = residual - q.detach()
            total = total + q
            indices.append(idx)
            perps.append(perp)
            for name, value in stage_losses.items():
                losses[name] = losses.get(name, 0) + value
        out = _from_rows(total, lead, x.dtype, self.channel_last)
        return VQOutput(out, torch.stack(indices, -1).view(*lead, self.num_quantizers), losses,
                        torch.stack(perps).mean())

    @torch.no_grad()
    def decode_indices(self, indices):
        """(..., Q) int64 indices -> the sum of the stages' codes, in forward's layout."""
        if not isinstance(indices, torch.Tensor) or indices.dtype != torch.long or indices.dim() < 1 \
                or indices.shape[-1] != self.num_quantizers:
            raise ValueError(f"indices must be an int64 tensor ending in num_quantizers={self.num_quantizers}")
        total = 0
        for s, (stage, scale) in enumerate(zip(self.stages, self.scales)):
            codes = stage.decode_indices(indices[..., s])           # channel-last stages
            total = total + codes * scale
        return total if self.channel_last else total.movedim(-1, 1)


def ResidualFSQ(levels, num_quantizers, *, channel_last=True):
    """num_quantizers stages of FSQ(levels), stage s on the residual scaled by levels^s."""
    _check_int(num_quantizers, "num_quantizers", 1)
    levels = list(levels)
    lv = torch.tensor(levels, dtype=torch.float32)
    scales = torch.stack([lv ** -s for s in range(num_quantizers)])
    return ResidualQuantizer([FSQ(levels) for _ in range(num_quantizers)], scales, channel_last=channel_last)


def ResidualLFQ(dim, num_quantizers, *, channel_last=True, **lfq_kwargs):
    """num_quantizers stages of LFQ(dim, codebook_scale=2^-s, **lfq_kwargs)."""
    _check_int(num_quantizers, "num_quantizers", 1)
    if "codebook_scale" in lfq_kwargs:
        raise ValueError("ResidualLFQ sets each stage's codebook_scale (2^-s); do not pass one")
    stages = [LFQ(dim, codebook_scale=2.0 ** -s, **lfq_kwargs) for s in range(num_quantizers)]
    return ResidualQuantizer(stages, torch.ones(num_quantizers), channel_last=channel_last)


__all__ = ["ResidualQuantizer", "ResidualFSQ", "ResidualLFQ"]
