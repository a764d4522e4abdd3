"""fastgen.nn.VectorQuantizer / ResidualVQ: VQ-VAE codebook layers on fastgen.ops.nearest_code.

The lookup is the exact, tiled argmin of fastgen.ops.nearest_code (never an N x K
distance matrix); the EMA statistics are scatters (bincount / index_add_), never an
N x K one-hot. Everything else is O(N * D).

Losses (van den Oord et al. 2017), both means over the elements of the code vectors:
    commitment = commitment_weight * ||z_e - sg(z_q)||^2    (trains the encoder)
    codebook   = ||sg(z_e) - z_q||^2                          (trains the codes; 0 with ema=True)
and z_q reaches the decoder by the straight-through estimator z_e + sg(z_q - z_e),
so the decoder's gradient passes to the encoder unchanged.

With ema=True the codes are not parameters: each training step moves the per-code
counts and sums of assigned inputs by an exponential moving average (decay 0.99) and
sets code k = sum_k / n_k with Laplace-smoothed counts n_k (eps 1e-5), as in the
paper's appendix. Under torch.distributed the counts and sums are all-reduced before
the update, so every rank keeps the same codebook (the result of one process seeing
the concatenated batch). Every rank must therefore run the same number of training
forward passes (each one is a collective); random choices (k-means seeds, dead-code
re-seeds) are rank 0's, broadcast.
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fastgen.ops import checks
from fastgen.ops.nearest_code import nearest_code


class VQOutput(NamedTuple):
    quantized: torch.Tensor   # z_q, the input's shape and dtype, straight-through gradients
    indices: torch.Tensor     # int64, the input's shape without the channel dim (+ (Q,) for ResidualVQ)
    losses: dict              # {"commitment": weighted, "codebook": ...}: float32 scalars; add them to the loss
    perplexity: torch.Tensor  # float32 scalar, exp(entropy of code usage in this batch), in [1, num_codes]


def _dist_ready():
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _all_reduce_(t):
    if _dist_ready():
        torch.distributed.all_reduce(t)
    return t


def _broadcast_(t):
    """Rank 0's value everywhere (random choices must agree across ranks)."""
    if _dist_ready():
        torch.distributed.broadcast(t, src=0)
    return t


def code_statistics(x, idx, num_codes, with_sums=True):
    """Per-code counts (K,) and sums of assigned rows (K, D) (None without `with_sums`),
    float32, by scatter: O(N * D) work and O(K * D) memory, no (N, K) one-hot.
    All-reduced (one call) under torch.distributed."""
    d = x.shape[1] if with_sums else 0
    stats = x.new_zeros((num_codes, d + 1), dtype=torch.float32)
    stats[:, 0] = torch.bincount(idx, minlength=num_codes).to(torch.float32)
    if with_sums:
        stats[:, 1:].index_add_(0, idx, x.to(torch.float32))
    _all_reduce_(stats)
    return stats[:, 0], (stats[:, 1:] if with_sums else None)


def _perplexity(counts):
    p = counts / counts.sum().clamp_min(1.0)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())


def _code_usage_perplexity(indices, num_codes):
    """_perplexity of a batch's code usage: counted over all codes up to 2^24, past that
    over the codes that occur (a bincount of 2^40 slots would not fit)."""
    if num_codes <= (1 << 24):
        counts = torch.bincount(indices, minlength=num_codes)
    else:
        counts = torch.unique(indices, return_counts=True)[1]
    return _perplexity(counts.float())


def _check_code_indices(indices, num_codes):
    """decode_indices' argument of the codebook-free quantizers: an int64 tensor of values
    in [0, num_codes)."""
    if not isinstance(indices, torch.Tensor) or indices.dtype != torch.long:
        raise TypeError("indices must be an int64 tensor")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= num_codes):
        raise ValueError(f"indices must be in [0, {num_codes}), got values in "
                         f"[{int(indices.min())}, {int(indices.max())}]")


def _to_rows(x, input_dim, channel_last):
    """x as (N, input_dim) rows plus the leading shape needed to undo it."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in checks.FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if channel_last:
        if x.dim() < 1 or x.shape[-1] != input_dim:
            raise ValueError(f"x must have input_dim={input_dim} channels in its last dimension "
                             f"(channel_last=True), got shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        rows = x.reshape(-1, input_dim)
    else:
        if x.dim() < 2 or x.shape[1] != input_dim:
            raise ValueError(f"x must be (B, C, ...) with C = input_dim={input_dim} "
                             f"(channel_last=False), got shape {tuple(x.shape)}")
        moved = x.movedim(1, -1)
        lead = moved.shape[:-1]
        rows = moved.reshape(-1, input_dim)
    if rows.shape[0] == 0:
        raise ValueError(f"x is empty (shape {tuple(x.shape)})")
    return rows, lead


def _from_rows(rows, lead, dtype, channel_last):
    out = rows.reshape(*lead, rows.shape[-1]).to(dtype)
    return out if channel_last else out.movedim(-1, 1)


def _projections(input_dim, dim):
    if input_dim == dim:
        return None, None
    return nn.Linear(input_dim, dim), nn.Linear(dim, input_dim)


def _project_in(proj, rows):
    if proj is not None:
        rows = proj(rows.to(proj.weight.dtype))
    return rows.float()


def _check_int(value, name, low):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def _check_float(value, name, low=None, high=None, low_open=False, high_open=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value}")


def rotate_onto(z, q):
    """s R z for (N, D) rows: R the rotation in the plane of z and q that turns z's
    direction into q's (R x = x - 2 r (r.x) + 2 q^ (e.x), e = z/|z|, q^ = q/|q|,
    r = (e + q^)/|e + q^|), s = |q|/|z|, both held constant (no gradient through them):
    the value is q up to rounding, the gradient s R^T. Rows with z = 0 (no direction) or
    q = -z direction (no unique plane) return z itself (straight through)."""
    with torch.no_grad():
        zn = z.norm(dim=1, keepdim=True)
        qn = q.norm(dim=1, keepdim=True)
        ok = (zn > 0) & (qn > 0)
        e = z / zn.clamp_min(1e-30)
        qh = q / qn.clamp_min(1e-30)
        w = e + qh
        wn = w.norm(dim=1, keepdim=True)
        ok &= wn > 1e-6
        r = w / wn.clamp_min(1e-30)
        scale = torch.where(ok, qn / zn.clamp_min(1e-30), torch.ones_like(zn))
        r = torch.where(ok, r, torch.zeros_like(r))
        qh = torch.where(ok, qh, torch.zeros_like(qh))
        e = torch.where(ok, e, torch.zeros_like(e))
    rz = z - 2 * r * (r * z).sum(1, keepdim=True) + 2 * qh * (e * z).sum(1, keepdim=True)
    return scale * rz


class VectorQuantizer(nn.Module):
    """Vector quantization layer for VQ-VAEs: z_e -> (z_q, indices, losses, perplexity).

    Args:
        num_codes: codebook size K.
        dim: code dimension D.
        input_dim: channels of the input when they differ from `dim`; a Linear projects
            in (input_dim -> dim) before the lookup and another back out after it.
        commitment: weight beta of the commitment loss (0.25 in the paper).
        ema: update the codes by exponential moving averages instead of the codebook loss.
        decay, eps: EMA decay and Laplace smoothing of the counts.
        kmeans_init: on the first training batch, set the codes by `kmeans_iters` rounds
            of k-means on that batch (exact assignments by nearest_code; under
            torch.distributed on the union of every rank's batch).
        dead_code_threshold: a code that no input used for this many consecutive
            training steps is re-seeded with a random encoder output from the current
            batch (rank 0's, broadcast). None disables it.
        cosine: l2-normalise inputs and codes, so the lookup is by cosine similarity
            and z_q is a unit vector.
        rotation_trick: the gradient reaches z through the rotation and rescaling that
            carry z onto its code (Fifty et al. 2024, "Restructuring vector quantization
            with the rotation trick"), held constant, instead of straight through: the
            value is the code exactly either way. Rows with z = 0, or whose code points
            exactly opposite to z, pass straight through.
        simvq: SimVQ (Zhu et al. 2024): the codes are a frozen random basis (K, D) times
            one learned D x D map (`code_map`), so every code moves with each step of the
            codebook loss and none can be left behind; needs ema, kmeans_init and
            dead_code_threshold off (nothing to re-seed).
        channel_last: True for inputs (..., C); False for channel-first (B, C, ...)
            such as conv feature maps (B, C, H, W).
        backend, precision: passed to fastgen.ops.nearest_code.

    Buffers: `usage` (K,) counts of assignments since construction (or reset_usage());
    with ema, `cluster_size` (K,) and `embed_sum` (K, D) are the EMA statistics.
    """

    def __init__(self, num_codes, dim, input_dim=None, *, commitment=0.25, ema=False, decay=0.99, eps=1e-5,
                 kmeans_init=False, kmeans_iters=10, dead_code_threshold=None, cosine=False,
                 channel_last=True, backend="auto", precision="fp32", rotation_trick=False, simvq=False):
        super().__init__()
        _check_int(num_codes, "num_codes", 1)
        _check_int(dim, "dim", 1)
        if input_dim is not None:
            _check_int(input_dim, "input_dim", 1)
        _check_float(commitment, "commitment", 0.0)
        _check_float(decay, "decay", 0.0, 1.0, low_open=False, high_open=True)
        _check_float(eps, "eps", 0.0, low_open=True)
        _check_int(kmeans_iters, "kmeans_iters", 0)
        if dead_code_threshold is not None:
            _check_int(dead_code_threshold, "dead_code_threshold", 1)
        if backend not in checks.BACKENDS:
            raise ValueError(f"backend must be one of {checks.BACKENDS}, got {backend!r}")
        checks.precision(precision)
        self.num_codes, self.dim = num_codes, dim
        self.input_dim = dim if input_dim is None else input_dim
        self.commitment, self.ema, self.decay, self.eps = float(commitment), bool(ema), float(decay), float(eps)
        self.kmeans_init, self.kmeans_iters = bool(kmeans_init), kmeans_iters
        self.dead_code_threshold = dead_code_threshold
        self.cosine, self.channel_last = bool(cosine), bool(channel_last)
        if not isinstance(rotation_trick, bool):
            raise TypeError(f"rotation_trick must be True or False, got {rotation_trick!r}")
        self.rotation_trick = rotation_trick
        if not isinstance(simvq, bool):
            raise TypeError(f"simvq must be True or False, got {simvq!r}")
        if simvq and (ema or kmeans_init or dead_code_threshold is not None):
            raise ValueError("simvq=True trains the codes through one linear map by the codebook loss: it needs "
                             "ema=False, kmeans_init=False and dead_code_threshold=None")
        self.simvq = simvq
        self.backend, self.precision = backend, precision

        self.project_in, self.project_out = _projections(self.input_dim, dim)

        init = torch.empty(num_codes, dim).uniform_(-1.0 / num_codes, 1.0 / num_codes)
        if cosine:
            init = F.normalize(torch.randn(num_codes, dim), dim=1)
        self.code_map = None
        if simvq:
            # the frozen basis, N(0, 1/D) as in the paper; the learned map starts as
            # nn.Linear does
            self.register_buffer("codebook", torch.randn(num_codes, dim) * dim ** -0.5)
            self.code_map = nn.Linear(dim, dim, bias=False)
        elif self.ema:
            self.register_buffer("codebook", init)
            # one pseudo-assignment per code at its initial position, so that codes no
            # input has reached yet stay where they are instead of being divided by ~eps
            self.register_buffer("cluster_size", torch.ones(num_codes))
            self.register_buffer("embed_sum", init.clone())
        else:
            self.codebook = nn.Parameter(init)
        self.register_buffer("initialized", torch.tensor(not self.kmeans_init))
        self.register_buffer("usage", torch.zeros(num_codes, dtype=torch.long))
        self.register_buffer("unused_steps", torch.zeros(num_codes, dtype=torch.long))

    # ---- helpers -------------------------------------------------------------------------

    def _codes(self):
        """The codebook as used for the lookup (normalised in cosine mode)."""
        c = self.codebook if self.code_map is None else self.code_map(self.codebook)
        return F.normalize(c, dim=1) if self.cosine else c

    def _lookup(self, z, codes):
        idx = nearest_code(z.detach(), codes.detach(), backend=self.backend, precision=self.precision).idx
        return idx

    @torch.no_grad()
    def _kmeans(self, z):
        """Codes by k-means on z (N, D) float32; under DDP, on the union of every rank's z."""
        n = z.shape[0]
        pick = torch.randint(n, (self.num_codes,), device=z.device) if n < self.num_codes \
            else torch.randperm(n, device=z.device)[:self.num_codes]
        centers = _broadcast_(z[pick].clone())
        counts = torch.zeros(self.num_codes, device=z.device)
        for _ in range(self.kmeans_iters):
            if self.cosine:
                centers = F.normalize(centers, dim=1)
            idx = self._lookup(z, centers)
            counts, sums = code_statistics(z, idx, self.num_codes)
            used = counts > 0
            # an empty cluster keeps its centre (the dead-code reset can revive it later)
            centers = torch.where(used[:, None], sums / counts.clamp_min(1.0)[:, None], centers)
        if self.cosine:
            centers = F.normalize(centers, dim=1)
        self.codebook.data.copy_(centers)
        if self.ema:
            size = counts.clamp_min(1.0)   # empty clusters: the pseudo-assignment again
            self.cluster_size.copy_(size)
            self.embed_sum.copy_(centers * size[:, None])
        self.initialized.fill_(True)

    @torch.no_grad()
    def _ema_update(self, counts, sums):
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.num_codes * self.eps) * n
        codes = self.embed_sum / smoothed[:, None]
        if self.cosine:
            codes = F.normalize(codes, dim=1)
        self.codebook.copy_(codes)

    @torch.no_grad()
    def _reset_dead(self, z, counts):
        self.unused_steps.add_(1).masked_fill_(counts > 0, 0)
        dead = (self.unused_steps >= self.dead_code_threshold).nonzero()[:, 0]
        if dead.numel() == 0:
            return
        pick = torch.randint(z.shape[0], (dead.numel(),), device=z.device)
        fresh = _broadcast_(z[pick].to(self.codebook.dtype).clone())
        if self.cosine:
            fresh = F.normalize(fresh, dim=1)
        self.codebook.data[dead] = fresh
        if self.ema:
            # one pseudo-assignment: the EMA holds the new code until real inputs arrive
            self.cluster_size[dead] = 1.0
            self.embed_sum[dead] = fresh
        self.unused_steps[dead] = 0

    def reset_usage(self):
        self.usage.zero_()

    # ---- forward -------------------------------------------------------------------------

    def forward(self, x):
        rows, lead = _to_rows(x, self.input_dim, self.channel_last)
        z = _project_in(self.project_in, rows)
        if self.cosine:
            z = F.normalize(z, dim=1)
        if self.training and not bool(self.initialized):
            self._kmeans(z.detach())

        codes = self._codes()
        idx = self._lookup(z, codes)
        q = codes[idx] if not self.ema else codes.detach()[idx]   # (N, D) float32, gathered

        commit = self.commitment * F.mse_loss(z, q.detach())
        if self.ema:
            codebook_loss = z.new_zeros(())
        else:
            codebook_loss = F.mse_loss(q, z.detach())

        with torch.no_grad():
            if self.training:
                counts, sums = code_statistics(z.detach(), idx, self.num_codes, with_sums=self.ema)
                if self.ema:
                    self._ema_update(counts, sums)
                if self.dead_code_threshold is not None:
                    self._reset_dead(z.detach(), counts)
            else:
                counts = torch.bincount(idx, minlength=self.num_codes).float()
            self.usage.add_(counts.long())
            perplexity = _perplexity(counts)

        # straight-through: the value is exactly the code (z - sg(z) is exactly 0),
        # the gradient w.r.t. z the identity; with the rotation trick, the gradient of
        # z -> s R z (s, R constants mapping z onto its code) instead
        carry = rotate_onto(z, q.detach()) if self.rotation_trick else z
        z_q = q.detach() + (carry - carry.detach())
        if self.project_out is not None:
            z_q = self.project_out(z_q)
        out = _from_rows(z_q, lead, x.dtype, self.channel_last)
        return VQOutput(out, idx.view(lead), {"commitment": commit, "codebook": codebook_loss}, perplexity)

    @torch.no_grad()
    def decode_indices(self, indices):
        """Integer code indices (any shape) -> the quantized vectors, as forward returns them
        (projected out, channel-first when channel_last=False)."""
        if not isinstance(indices, torch.Tensor) or indices.dtype in checks.FLOAT_DTYPES + (torch.float64,):
            raise TypeError("indices must be an integer torch.Tensor")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.num_codes):
            raise ValueError(f"indices must be in [0, {self.num_codes}), got values in "
                             f"[{int(indices.min())}, {int(indices.max())}]")
        q = self._codes()[indices.reshape(-1).long()]
        if self.project_out is not None:
            q = self.project_out(q)
        return _from_rows(q, indices.shape, q.dtype, self.channel_last)

    def extra_repr(self):
        proj = f", input_dim={self.input_dim}" if self.project_in is not None else ""
        mode = f"ema(decay={self.decay}, eps={self.eps})" if self.ema else "codebook loss"
        return (f"num_codes={self.num_codes}, dim={self.dim}{proj}, commitment={self.commitment}, {mode}, "
                f"kmeans_init={self.kmeans_init}, dead_code_threshold={self.dead_code_threshold}, "
                f"cosine={self.cosine}, channel_last={self.channel_last}, backend={self.backend!r}, "
                f"precision={self.precision!r}")


class ResidualVQ(nn.Module):
    """Residual vector quantization (Zeghidour et al. 2021, SoundStream): quantizer i
    quantizes what quantizers 0..i-1 left over; z_q is the sum of the stages.

    Args:
        num_quantizers: number of stages Q.
        num_codes, dim, input_dim, channel_last: as in VectorQuantizer; the projection
            (when input_dim != dim) is shared by all stages.
        **kwargs: the other VectorQuantizer arguments, used by every stage.

    Returns VQOutput with indices of shape (..., Q), losses summed over stages and the
    mean perplexity over stages.
    """

    def __init__(self, num_quantizers, num_codes, dim, input_dim=None, *, channel_last=True, **kwargs):
        super().__init__()
        if kwargs.get("rotation_trick"):
            raise ValueError("ResidualVQ passes the gradient straight through the sum of its stages: "
                             "rotation_trick is not supported here")
        _check_int(num_quantizers, "num_quantizers", 1)
        _check_int(dim, "dim", 1)
        if input_dim is not None:
            _check_int(input_dim, "input_dim", 1)
        self.num_quantizers, self.dim = num_quantizers, dim
        self.input_dim = dim if input_dim is None else input_dim
        self.channel_last = bool(channel_last)
        self.project_in, self.project_out = _projections(self.input_dim, dim)
        self.stages = nn.ModuleList(VectorQuantizer(num_codes, dim, channel_last=True, **kwargs)
                                    for _ in range(num_quantizers))

    def forward(self, x):
        rows, lead = _to_rows(x, self.input_dim, self.channel_last)
        z = _project_in(self.project_in, rows)
        residual, total = z, torch.zeros_like(z)
        indices, perps = [], []
        losses = {"commitment": z.new_zeros(()), "codebook": z.new_zeros(())}
        for stage in self.stages:
            q, idx, stage_losses, perp = stage(residual)
            total = total + q.detach()
            residual = residual - q.detach()
            indices.append(idx)
            perps.append(perp)
            for name, value in stage_losses.items():
                losses[name] = losses[name] + value
        z_q = total + (z - z.detach())   # straight-through for the sum of the stages
        if self.project_out is not None:
            z_q = self.project_out(z_q)
        out = _from_rows(z_q, lead, x.dtype, self.channel_last)
        idx = torch.stack(indices, dim=-1).view(*lead, self.num_quantizers)
        return VQOutput(out, idx, losses, torch.stack(perps).mean())

    @torch.no_grad()
    def decode_indices(self, indices):
        """(..., Q) integer indices -> the quantized vectors, as forward returns them."""
        if not isinstance(indices, torch.Tensor) or indices.dim() < 1 or indices.shape[-1] != self.num_quantizers:
            raise ValueError(f"indices must be a tensor ending in num_quantizers={self.num_quantizers}")
        q = sum(stage._codes()[indices[..., i].reshape(-1).long()] for i, stage in enumerate(self.stages))
        if self.project_out is not None:
            q = self.project_out(q)
        return _from_rows(q, indices.shape[:-1], q.dtype, self.channel_last)

    def extra_repr(self):
        proj = f", input_dim={self.input_dim}" if self.project_in is not None else ""
        return f"num_quantizers={self.num_quantizers}, dim={self.dim}{proj}, channel_last={self.channel_last}"
