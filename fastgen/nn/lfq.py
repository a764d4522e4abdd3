"""Lookup-free quantization (Yu et al., MAGVIT-v2, ICLR 2024): no codebook search.

Each of the d channels is quantized to its sign, q_i = scale * sign(z_i) (zero goes to
-scale), with a straight-through gradient; the implicit codebook is {-scale, +scale}^d,
2^d codes, and a code's index reads the positive channels as bits, the first channel the
most significant (vector-quantize-pytorch's order, so the two give the same indices).

The entropy penalty (training only) keeps every code in use and each assignment sure:

    entropy = weight * (mean_n H(p(. | z_n)) - gamma * H(mean_n p(. | z_n)))

with p(c | z) = softmax_c(-inv_temperature * ||z - c||^2) over all 2^d codes. Since
every code has the same norm, p factorises over the channels: p(c_i = +scale | z) =
sigmoid(4 * inv_temperature * scale * z_i), so the per-sample entropy is a sum of d
binary entropies (O(N d)). The batch distribution mean_n p(. | z_n) does not factorise;
it is accumulated over chunks of rows (one (rows, 2^d) block at a time, never (N, 2^d))
and its gradient is recomputed chunk by chunk in backward, so memory stays
O(2^d + chunk * 2^d) whatever N is. That is why d is capped at 20 with the penalty on.

    commitment = commitment_weight * ||z - sg(q)||^2 (mean over elements; default 0, as
    in vector-quantize-pytorch).
"""
import math

import torch
from torch import nn

from fastgen.nn.vector_quantizer import VQOutput, _check_code_indices, _code_usage_perplexity, _from_rows, _to_rows

# rows x 2^d values per block of the batch-entropy pass: 2^22 floats = 16 MB
_BLOCK_ELEMS = 1 << 22
MAX_ENTROPY_DIM = 20


def _code_bits(d, device):
    """(2^d, d) float32 0/1: bit i of code c, first channel the most significant."""
    c = torch.arange(1 << d, device=device)
    shifts = torch.arange(d - 1, -1, -1, device=device)
    return ((c[:, None] >> shifts) & 1).float()


def _binary_entropy_from_logits(a):
    """H of Bernoulli(sigmoid(a)), stable for large |a| (nats)."""
    p = torch.sigmoid(a)
    return nn.functional.softplus(-a) * p + nn.functional.softplus(a) * (1 - p)


class _BatchCodeEntropy(torch.autograd.Function):
    """H(mean_n p(. | z_n)) from the per-channel logits a (N, d) of p(c_i = +1 | z_n),
    in blocks of rows: forward keeps only the (2^d,) mean; backward recomputes each
    block's p to form dH/da = [G P_n] B - sigmoid(a) * (G P_n) 1, with G = -(log P + 1)/N."""

    @staticmethod
    def forward(ctx, a, bits):
        n, d = a.shape
        block = max(1, _BLOCK_ELEMS // bits.shape[0])
        mean = torch.zeros(bits.shape[0], dtype=torch.float64, device=a.device)
        for s in range(0, n, block):
            mean += _block_probs(a[s:s + block], bits).sum(0, dtype=torch.float64)
        mean /= n
        ctx.save_for_backward(a, bits, mean)
        return -(mean * torch.log(mean.clamp_min(1e-300))).sum().float()

    @staticmethod
    def backward(ctx, grad):
        a, bits, mean = ctx.saved_tensors
        n = a.shape[0]
        g = (-(torch.log(mean.clamp_min(1e-300)) + 1) / n * grad).float()     # dH/dp_n(c), (2^d,)
        block = max(1, _BLOCK_ELEMS // bits.shape[0])
        out = torch.empty_like(a)
        for s in range(0, n, block):
            ab = a[s:s + block]
            gp = _block_probs(ab, bits) * g                                     # (rows, 2^d)
            out[s:s + block] = gp @ bits - torch.sigmoid(ab) * gp.sum(1, keepdim=True)
        return out, None


def _block_probs(a, bits):
    """(rows, 2^d) p(c | z) = prod_i p(c_i | z) from the logits a (rows, d)."""
    lp_pos, lp_neg = nn.functional.logsigmoid(a), nn.functional.logsigmoid(-a)
    return torch.exp(lp_neg.sum(1, keepdim=True) + (lp_pos - lp_neg) @ bits.T)


class LFQ(nn.Module):
    """LFQ(dim): quantize d = dim channels to their signs; 2^dim implicit codes.

    forward(x) -> VQOutput(quantized (+-codebook_scale, straight-through gradients),
    indices int64 in [0, 2^dim), losses {"entropy": ..., "commitment": ...} (zeros in
    eval mode, as in vector-quantize-pytorch), perplexity of the batch's code usage).
    x: (..., dim) with channel_last=True, or (B, dim, ...) with channel_last=False;
    float32/float16/bfloat16 (computed in float32, returned in x's dtype).
    decode_indices(indices) -> (..., dim) float32 codes.

    Arguments as vector-quantize-pytorch's LFQ: entropy_weight (its
    entropy_loss_weight, 0.1), diversity_gamma (1.0), inv_temperature (100, its forward
    argument), commitment_weight (0.0), codebook_scale (1.0). Differences: the entropies
    here are exact (no 1e-5 clamp inside the logarithms) and the batch entropy never
    holds an (N, 2^d) matrix. No state; under DDP each rank's penalty is of its own
    batch (the batch entropy is not averaged across ranks).
    """

    def __init__(self, dim, *, entropy_weight=0.1, diversity_gamma=1.0, inv_temperature=100.0,
                 commitment_weight=0.0, codebook_scale=1.0, channel_last=True):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= 62:
            raise ValueError(f"dim must be an int in [1, 62] (2^dim codes), got {dim!r}")
        for name, v in (("entropy_weight", entropy_weight), ("commitment_weight", commitment_weight),
                        ("diversity_gamma", diversity_gamma)):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        for name, v in (("inv_temperature", inv_temperature), ("codebook_scale", codebook_scale)):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        if entropy_weight > 0 and dim > MAX_ENTROPY_DIM:
            raise ValueError(f"the entropy penalty sums over all 2^dim codes: dim={dim} is over "
                             f"{MAX_ENTROPY_DIM}; use entropy_weight=0 or fewer channels")
        self.dim = dim
        self.num_codes = 1 << dim
        self.entropy_weight = float(entropy_weight)
        self.diversity_gamma = float(diversity_gamma)
        self.inv_temperature = float(inv_temperature)
        self.commitment_weight = float(commitment_weight)
        self.codebook_scale = float(codebook_scale)
        self.channel_last = bool(channel_last)
        self.register_buffer("_weights", 2 ** torch.arange(dim - 1, -1, -1, dtype=torch.long), persistent=False)

    def extra_repr(self):
        return (f"dim={self.dim}, num_codes={self.num_codes}, entropy_weight={self.entropy_weight}, "
                f"commitment_weight={self.commitment_weight}, channel_last={self.channel_last}")

    def forward(self, x):
        rows, lead = _to_rows(x, self.dim, self.channel_last)
        z = rows.float()
        if not bool(torch.isfinite(z).all()):
            raise ValueError("x has non-finite values (NaN or inf)")
        positive = z > 0
        q = torch.where(positive, self.codebook_scale, -self.codebook_scale)
        out = z + (q - z).detach()                      # straight-through
        indices = (positive.long() * self._weights).sum(-1)
        zero = z.new_zeros(())
        entropy, commitment = zero, zero
        if self.training and self.entropy_weight > 0:
            a = z * (4 * self.inv_temperature * self.codebook_scale)
            per_sample = _binary_entropy_from_logits(a).sum(1).mean()
            batch = _BatchCodeEntropy.apply(a, _code_bits(self.dim, z.device))
            entropy = self.entropy_weight * (per_sample - self.diversity_gamma * batch)
        if self.training and self.commitment_weight > 0:
            commitment = self.commitment_weight * (z - q).square().mean()
        quantized = _from_rows(out, lead, x.dtype, self.channel_last)
        return VQOutput(quantized, indices.view(lead), {"entropy": entropy, "commitment": commitment},
                        _code_usage_perplexity(indices, self.num_codes))

    def decode_indices(self, indices):
        """int64 indices (any shape) -> their codes, (*shape, dim) float32 of +-codebook_scale
        (as forward returns them: channel dim second with channel_last=False)."""
        _check_code_indices(indices, self.num_codes)
        bits = (indices.unsqueeze(-1) // self._weights) % 2
        codes = (bits.float() * 2 - 1) * self.codebook_scale
        return codes if self.channel_last else codes.movedim(-1, 1)
