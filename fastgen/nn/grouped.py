"""Grouped (multi-head) quantization: the channels split into `groups` equal parts, each
quantized on its own -- by one shared quantizer of dim / groups channels (the part's rows
stacked into one batch: one codebook, `groups` codes per vector), or by one quantizer per
group (separate codebooks). vector-quantize-pytorch calls these heads (with or without
separate_codebook_per_head).

A vector gets `groups` codes: indices (..., groups), so K codes per group give K^groups
combinations for the cost of `groups` lookups in a K-code book.
"""
import torch
from torch import nn

from fastgen.nn.vector_quantizer import VQOutput, _check_int, _from_rows, _to_rows


class GroupedQuantizer(nn.Module):
    """GroupedQuantizer(quantizers, groups=None): `quantizers` one channel-last quantizer
    (shared by every group; pass `groups`) or a list of them, one per group (groups =
    len(list)); all of one dim d, so dim = groups * d.

    forward(x) -> VQOutput(the groups' outputs side by side, indices (..., groups), losses
    averaged over the groups per name -- the scale a shared quantizer's one call over all
    groups gives, so switching between shared and separate keeps the loss weights --, mean
    perplexity). decode_indices((..., groups)) -> the vectors, in forward's layout."""

    def __init__(self, quantizers, groups=None, *, channel_last=True):
        super().__init__()
        if isinstance(quantizers, nn.Module):
            _check_int(groups, "groups", 1)
            self.shared, parts = True, [quantizers]
        else:
            parts = list(quantizers)
            if not parts:
                raise ValueError("quantizers must hold at least one quantizer")
            if groups is not None and groups != len(parts):
                raise ValueError(f"groups={groups} but {len(parts)} quantizers were given (one per group)")
            self.shared, groups = False, len(parts)
        if len({q.dim for q in parts}) != 1:
            raise ValueError("every group's quantizer must have the same dim")
        if len({q.num_codes for q in parts}) != 1:
            raise ValueError("every group's quantizer must have the same num_codes")
        if any(not q.channel_last for q in parts):
            raise ValueError("the quantizers must be channel-last (this module handles the layout)")
        self.quantizers = nn.ModuleList(parts)
        self.groups, self.group_dim = groups, parts[0].dim
        self.dim, self.num_codes = groups * self.group_dim, parts[0].num_codes
        self.channel_last = bool(channel_last)

    def forward(self, x):
        rows, lead = _to_rows(x, self.dim, self.channel_last)
        n, g, d = rows.shape[0], self.groups, self.group_dim
        if self.shared:
            q, idx, losses, perp = self.quantizers[0](rows.reshape(n * g, d))
            out, idx = q.reshape(n, g * d), idx.reshape(n, g)
        else:
            outs, idxs, perps, losses = [], [], [], {}
            for part, quantizer in zip(rows.split(d, dim=1), self.quantizers):
                q, i, part_losses, p = quantizer(part)
                outs.append(q)
                idxs.append(i)
                perps.append(p)
                for name, value in part_losses.items():
                    losses[name] = losses.get(name, 0) + value
            losses = {name: value / g for name, value in losses.items()}
            out, idx, perp = torch.cat(outs, 1), torch.stack(idxs, 1), torch.stack(perps).mean()
        return VQOutput(_from_rows(out, lead, x.dtype, self.channel_last), idx.view(*lead, g), losses, perp)

    @torch.no_grad()
    def decode_indices(self, indices):
        """(..., groups) int64 indices -> the vectors (..., dim), in forward's layout."""
        if not isinstance(indices, torch.Tensor) or indices.dtype != torch.long or indices.dim() < 1 \
                or indices.shape[-1] != self.groups:
            raise ValueError(f"indices must be an int64 tensor ending in groups={self.groups}")
        if self.shared:
            codes = self.quantizers[0].decode_indices(indices)               # (..., groups, d)
        else:
            codes = torch.stack([q.decode_indices(indices[..., i]) for i, q in enumerate(self.quantizers)], -2)
        out = codes.reshape(*indices.shape[:-1], self.dim)
        return out if self.channel_last else out.movedim(-1, 1)
