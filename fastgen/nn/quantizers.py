"""The quantizer contract, and the one place that builds a quantizer from a config.

A quantizer is an nn.Module with
    num_codes                  the number of codes (indices lie in [0, num_codes))
    dim                        the channels it quantizes (the encoder's output width)
    channel_last               True: x is (..., dim); False: x is (B, dim, ...)
    forward(x) -> VQOutput(quantized, indices, losses, perplexity)
        quantized: x's shape and dtype, gradients reaching x (straight-through or the
        quantizer's own estimator); indices: int64, x's shape without the channel dim;
        losses: {name: float32 scalar} to add to the training loss (empty if none);
        perplexity: exp(entropy of this batch's code usage).
    decode_indices(indices) -> what forward's `quantized` holds for those indices, in the
        same layout (channel dim last, or second with channel_last=False), no gradient.
DDP: a quantizer with state (VectorQuantizer's EMA and dead-code statistics) all-reduces
it inside forward, so every rank must call forward the same number of times; FSQ and LFQ
have none.

Adding one is a module in fastgen/nn with its test, and an entry in `make_quantizer`:
the models (VQVAE) and the CLI (`--quantizer`) build theirs here.

Several codes per position: `make_quantizer(..., stages=S)` wraps any kind in residual
quantization (ResidualVQ, ResidualFSQ, ResidualLFQ) and `groups=G` splits the channels
into G heads sharing one quantizer (GroupedQuantizer, vector-quantize-pytorch's `heads`
without separate codebooks). Their indices carry a last dim of S or G codes.
"""
import math

from fastgen.nn.fsq import FSQ
from fastgen.nn.lfq import LFQ
from fastgen.nn.vector_quantizer import VectorQuantizer

QUANTIZERS = ("vq", "simvq", "fsq", "lfq")


def quantizer_shape(kind, num_codes=None, code_dim=None, levels=None):
    """(num_codes, dim) a quantizer of `kind` would have: vq and simvq take both as given, fsq
    derives them from `levels` (prod, len), lfq from num_codes (a power of two: log2)."""
    if kind not in QUANTIZERS:
        raise ValueError(f"quantizer must be one of {QUANTIZERS}, got {kind!r}")
    if kind == "fsq":
        if not levels:
            raise ValueError("quantizer='fsq' needs levels (e.g. [8, 5, 5, 5])")
        return math.prod(levels), len(levels)
    if kind == "lfq":
        if isinstance(num_codes, bool) or not isinstance(num_codes, int) or num_codes < 2 \
                or num_codes & (num_codes - 1):
            raise ValueError(f"quantizer='lfq' needs num_codes a power of two >= 2, got {num_codes!r}")
        return num_codes, num_codes.bit_length() - 1
    return num_codes, code_dim


def make_quantizer(kind, *, num_codes=None, code_dim=None, levels=None, commitment=0.25, ema=True, decay=0.99,
                   kmeans_init=True, dead_code_threshold=20, entropy_weight=0.1, rotation_trick=False,
                   channel_last=True, stages=1, groups=1):
    """One quantizer, or with stages > 1 a residual one and with groups > 1 a grouped one
    (module docstring); for groups, code_dim is the total over the groups (vq / simvq) and
    fsq / lfq take their per-group shape from levels / num_codes."""
    for name, v in (("stages", stages), ("groups", groups)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if stages > 1 and groups > 1:
        raise ValueError("stages > 1 (residual) and groups > 1 (grouped) do not combine here; choose one")
    args = dict(num_codes=num_codes, code_dim=code_dim, levels=levels, commitment=commitment, ema=ema, decay=decay,
                kmeans_init=kmeans_init, dead_code_threshold=dead_code_threshold, entropy_weight=entropy_weight,
                rotation_trick=rotation_trick)
    if groups > 1:
        from fastgen.nn.grouped import GroupedQuantizer
        if kind in ("vq", "simvq"):
            if code_dim is None or code_dim % groups:
                raise ValueError(f"code_dim ({code_dim}) must be divisible by groups ({groups})")
            args["code_dim"] = code_dim // groups
        return GroupedQuantizer(_single(kind, channel_last=True, **args), groups=groups, channel_last=channel_last)
    if stages > 1:
        from fastgen.nn.residual import ResidualFSQ, ResidualLFQ
        from fastgen.nn.vector_quantizer import ResidualVQ
        n, d = quantizer_shape(kind, num_codes, code_dim, levels)
        if rotation_trick and kind not in ("vq", "simvq"):
            raise ValueError(f"rotation_trick is for quantizer='vq' or 'simvq' (a codebook); {kind!r} rounds per channel")
        if kind == "fsq":
            return ResidualFSQ(list(levels), stages, channel_last=channel_last)
        if kind == "lfq":
            return ResidualLFQ(d, stages, channel_last=channel_last, entropy_weight=entropy_weight,
                               commitment_weight=commitment)
        if kind == "simvq":
            return ResidualVQ(stages, n, d, channel_last=channel_last, commitment=commitment, simvq=True,
                              rotation_trick=rotation_trick)
        return ResidualVQ(stages, n, d, channel_last=channel_last, commitment=commitment, ema=ema, decay=decay,
                          kmeans_init=kmeans_init, dead_code_threshold=dead_code_threshold,
                          rotation_trick=rotation_trick)
    return _single(kind, channel_last=channel_last, **args)


def group_dim(kind, code_dim, levels, num_codes, groups):
    """The channels the encoder must give a quantizer of `groups` heads."""
    n, d = quantizer_shape(kind, num_codes, code_dim, levels)
    return d if kind in ("vq", "simvq") else d * groups


def _single(kind, *, num_codes=None, code_dim=None, levels=None, commitment=0.25, ema=True, decay=0.99,
            kmeans_init=True, dead_code_threshold=20, entropy_weight=0.1, rotation_trick=False,
            channel_last=True):
    """The quantizer a model config names. vq: VectorQuantizer(num_codes, code_dim, ...);
    simvq: the same with simvq=True (its codes a frozen basis through a learned map: no EMA,
    k-means init or dead-code reset, whatever those arguments say); fsq: FSQ(levels); lfq: LFQ(log2(num_codes), entropy_weight=..., commitment_weight=commitment).
    rotation_trick: vq's gradient estimator (fsq and lfq have no codebook to rotate onto:
    asking for it there raises)."""
    n, d = quantizer_shape(kind, num_codes, code_dim, levels)
    if rotation_trick and kind not in ("vq", "simvq"):
        raise ValueError(f"rotation_trick is for quantizer='vq' or 'simvq' (a codebook); {kind!r} rounds per channel")
    if kind == "fsq":
        return FSQ(list(levels), channel_last=channel_last)
    if kind == "lfq":
        return LFQ(d, entropy_weight=entropy_weight, commitment_weight=commitment, channel_last=channel_last)
    if kind == "simvq":
        return VectorQuantizer(n, d, commitment=commitment, simvq=True, rotation_trick=rotation_trick,
                               channel_last=channel_last)
    return VectorQuantizer(n, d, commitment=commitment, ema=ema, decay=decay, kmeans_init=kmeans_init,
                           dead_code_threshold=dead_code_threshold, rotation_trick=rotation_trick,
                           channel_last=channel_last)
