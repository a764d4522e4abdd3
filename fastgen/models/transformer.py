"""fastgen.models.CodeTransformer: a DALL-E-style decoder-only transformer over
[caption tokens ; image code tokens] (Ramesh et al. 2021, at toy scale).

Sequence: T text positions (the caption's UTF-8 bytes, then PAD; a dropped caption is
NULL then PAD) followed by L image positions (a VQ-VAE's code map flattened in raster
order; for a VQ-VAE-2 the top map, then the bottom map). Text and code tokens have
their own embeddings, each position a learned embedding; causal self-attention through
torch.nn.functional.scaled_dot_product_attention; the head predicts the next image code.
By default the loss is over the image positions only (the captions are given, not
modelled); `text_loss_weight` w > 0 models the caption too, as DALL-E does: a text head
predicts each next caption byte (and the end of the caption, the first PAD), and the
loss is w * text + (1 - w) * image (DALL-E: w = 1/8).

Sampling (`sample`): the caption is run once (prefill), then one position per step with
a KV cache -- every layer keeps the keys and values of the positions so far, so a new
token costs one position's attention instead of a forward over the prefix
(`sample(..., cache=False)` recomputes the prefix every step; the same tokens).
Temperature, top-k and top-p (nucleus) filtering; classifier-free guidance with
`guidance` > 0: the conditional and the unconditional (NULL caption) streams run in one
batch and the logits mix as  uncond + (1 + guidance) (cond - uncond). Training drops the
caption with probability `p_uncond` so the unconditional stream is learnt.
"""

import torch
import torch.nn.functional as F
from torch import nn

PAD, NULL = 256, 257          # text vocabulary: bytes 0..255, PAD, NULL (a dropped caption)
TEXT_VOCAB = 258


def encode_captions(captions, length):
    """List of str -> (B, length) int64 byte tokens, PAD-filled. Empty, non-str or
    too-long captions raise ValueError naming the caption."""
    if isinstance(captions, str):
        captions = [captions]
    out = torch.full((len(captions), length), PAD, dtype=torch.long)
    for i, c in enumerate(captions):
        if not isinstance(c, str):
            raise ValueError(f"caption {i} must be a str, got {type(c).__name__}")
        try:
            b = c.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"caption {i} ({c!r}) is not valid UTF-8 text") from None
        if not b.strip():
            raise ValueError(f"caption {i} is empty")
        if len(b) > length:
            raise ValueError(f"caption {i} ({c!r}) is {len(b)} bytes, longer than the model's context of "
                             f"{length} text tokens")
        out[i, :len(b)] = torch.tensor(list(b), dtype=torch.long)
    return out


def null_captions(n, length):
    out = torch.full((n, length), PAD, dtype=torch.long)
    out[:, 0] = NULL
    return out


class Block(nn.Module):
    def __init__(self, dim, heads, dropout):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.dropout = dropout

    def _split(self, t):
        b, n, d = t.shape
        return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x, cache=None):
        """x (B, n, d). cache: None (causal over x), or this layer's dict of preallocated
        keys/values ("k", "v": (B, heads, max_len, d/heads)) and "n", the positions held;
        the new positions are written after them."""
        q, k, v = (self._split(t) for t in self.qkv(self.ln1(x)).chunk(3, dim=-1))
        if cache is None:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=self.dropout if self.training else 0.0)
        else:
            n0, n1 = cache["n"], cache["n"] + q.shape[2]
            cache["k"][:, :, n0:n1], cache["v"][:, :, n0:n1] = k, v
            cache["n"] = n1
            k, v = cache["k"][:, :, :n1], cache["v"][:, :, :n1]
            if n0 == 0:
                a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            elif q.shape[2] == 1:        # one new position sees every position so far: no mask
                a = F.scaled_dot_product_attention(q, k, v)
            else:
                mask = torch.ones(q.shape[2], n1, dtype=torch.bool, device=x.device).tril(n0)
                a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(a.transpose(1, 2).reshape(x.shape))
        return x + self.mlp(self.ln2(x))


class CodeTransformer(nn.Module):
    """Args:
        num_codes: the VQ codebook size (image vocabulary).
        image_tokens: L, codes per image (h*w; for VQ-VAE-2 h_t*w_t + h_b*w_b).
        text_tokens: T, caption bytes (captions longer than this are refused).
        dim, layers, heads, dropout: the transformer.
        p_uncond: probability of training on the NULL caption (classifier-free guidance).
        text_loss_weight: weight of the caption's own loss (0: the caption is not modelled;
            DALL-E's 1/8 = 0.125).
    """

    def __init__(self, num_codes, image_tokens, text_tokens=16, dim=128, layers=4, heads=4, dropout=0.0,
                 p_uncond=0.1, text_loss_weight=0.0):
        super().__init__()
        if not 0 <= text_loss_weight < 1:
            raise ValueError(f"text_loss_weight must be in [0, 1), got {text_loss_weight}")
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        if not 0 <= p_uncond < 1:
            raise ValueError(f"p_uncond must be in [0, 1), got {p_uncond}")
        self.config = dict(num_codes=num_codes, image_tokens=image_tokens, text_tokens=text_tokens, dim=dim,
                           layers=layers, heads=heads, dropout=dropout, p_uncond=p_uncond,
                           **({"text_loss_weight": text_loss_weight} if text_loss_weight else {}))
        self.text_loss_weight = text_loss_weight
        self.num_codes, self.image_tokens, self.text_tokens = num_codes, image_tokens, text_tokens
        self.p_uncond = p_uncond
        self.text_embed = nn.Embedding(TEXT_VOCAB, dim)
        self.code_embed = nn.Embedding(num_codes, dim)
        self.pos = nn.Parameter(torch.randn(text_tokens + image_tokens, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, dropout) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_codes)
        # only when the caption is modelled: older checkpoints keep their state dict
        self.text_head = nn.Linear(dim, TEXT_VOCAB) if text_loss_weight else None

    def _check(self, text, codes):
        if not isinstance(text, torch.Tensor) or text.dim() != 2 or text.shape[1] != self.text_tokens:
            raise ValueError(f"text must be (B, {self.text_tokens}) tokens (encode_captions), got "
                             f"{tuple(getattr(text, 'shape', ()))}")
        if text.dtype.is_floating_point or (text.numel() and (int(text.min()) < 0 or int(text.max()) >= TEXT_VOCAB)):
            raise ValueError(f"text must hold integer tokens in [0, {TEXT_VOCAB}) (encode_captions), got "
                             f"{text.dtype}" + ("" if text.dtype.is_floating_point or not text.numel() else
                                                f" in [{int(text.min())}, {int(text.max())}]"))
        if codes is not None:
            if not isinstance(codes, torch.Tensor) or codes.dim() != 2 or codes.shape[0] != text.shape[0] \
                    or codes.shape[1] > self.image_tokens or codes.dtype.is_floating_point:
                raise ValueError(f"codes must be integer (B, <= {self.image_tokens}) with B = {text.shape[0]}, got "
                                 f"{getattr(codes, 'dtype', '')} {tuple(getattr(codes, 'shape', ()))}")
            if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.num_codes):
                raise ValueError(f"codes must be in [0, {self.num_codes})")

    def _embed(self, text, codes, start):
        parts = []
        if text is not None:
            parts.append(self.text_embed(text))
        if codes is not None and codes.shape[1]:
            parts.append(self.code_embed(codes))
        x = torch.cat(parts, 1)
        return x + self.pos[start:start + x.shape[1]]

    def _hidden(self, x, caches=None):
        for i, blk in enumerate(self.blocks):
            x = blk(x, None if caches is None else caches[i])
        return self.ln(x)

    def _run(self, x, caches=None):
        return self.head(self._hidden(x, caches))

    def pack(self, text, codes):
        return torch.cat([text, codes], 1)

    def forward(self, text, codes=None):
        """dict(loss = mean cross-entropy over the image codes (nats), nll (B,) nats per image).
        The caption is replaced by NULL with probability p_uncond while training. With
        codes=None, `text` holds packed rows pack(text, codes) (what training iterates over)."""
        if codes is None:
            if not isinstance(text, torch.Tensor) or text.dim() != 2 or \
                    text.shape[1] != self.text_tokens + self.image_tokens:
                raise ValueError(f"packed rows must be (B, {self.text_tokens + self.image_tokens}) (caption tokens "
                                 f"then codes), got {tuple(getattr(text, 'shape', ()))}")
            text, codes = text[:, :self.text_tokens], text[:, self.text_tokens:]
        self._check(text, codes)
        if codes.shape[1] != self.image_tokens:
            raise ValueError(f"codes must have {self.image_tokens} tokens per image, got {codes.shape[1]}")
        if self.training and self.p_uncond > 0:
            drop = torch.rand(text.shape[0], device=text.device) < self.p_uncond
            text = torch.where(drop[:, None], null_captions(text.shape[0], self.text_tokens).to(text.device), text)
        hidden = self._hidden(self._embed(text, codes[:, :-1], 0))
        logits = self.head(hidden[:, self.text_tokens - 1:])
        ce = F.cross_entropy(logits.transpose(1, 2), codes, reduction="none")
        out = dict(loss=ce.mean(), nll=ce.detach().sum(1))
        if self.text_head is not None:
            out["text_loss"] = self.text_loss(hidden, text)
            w = self.text_loss_weight
            out["loss"] = w * out["text_loss"] + (1 - w) * out["loss"]
        return out

    def text_loss(self, hidden, text):
        """Mean cross-entropy of each caption byte from the positions before it; the
        targets are the bytes and the caption's end (its first PAD), not the PADs after it.
        The first byte has no position before it (there is no start token) and is not
        predicted; rows whose caption was dropped (NULL, for guidance) are not counted."""
        target, prev = text[:, 1:], text[:, :-1]
        keep = ((target != PAD) | (prev != PAD)) & (text[:, :1] != NULL)
        ce = F.cross_entropy(self.text_head(hidden[:, :self.text_tokens - 1]).transpose(1, 2), target,
                             reduction="none")
        return (ce * keep).sum() / keep.sum().clamp_min(1)

    @staticmethod
    def _filter(logits, temperature, top_k, top_p):
        # the largest logit is subtracted before dividing: a tiny temperature (1e-40) then
        # gives -inf for the others and 0 for the best, a greedy draw, instead of inf - inf = nan
        logits = logits.float()
        logits = (logits - logits.amax(-1, keepdim=True)) / temperature
        if top_k:
            kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p is not None and top_p < 1:
            sorted_l, order = torch.sort(logits, descending=True, dim=-1)
            probs = torch.softmax(sorted_l, -1)
            # drop a token once the tokens before it already hold top_p of the mass
            drop = (probs.cumsum(-1) - probs) > top_p
            sorted_l = sorted_l.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_l)
        return logits

    @torch.no_grad()
    def sample(self, text, generator=None, temperature=1.0, top_k=None, top_p=None, guidance=0.0, cache=True):
        """Image codes (B, L) for captions `text` (B, T) (encode_captions)."""
        self._check(text, None)
        if not 0 < temperature < float("inf"):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if not 0 <= guidance < float("inf"):     # nan too: it would silently mean no guidance
            raise ValueError(f"guidance must be a finite number >= 0, got {guidance}")
        b = text.shape[0]
        if guidance > 0:   # both streams in one batch: rows b.. are the unconditional ones
            text = torch.cat([text, null_captions(b, self.text_tokens).to(text.device)])
        codes = torch.zeros(text.shape[0], 0, dtype=torch.long, device=text.device)
        caches = None
        if cache:
            hd = self.pos.shape[1] // self.blocks[0].heads
            shape = (text.shape[0], self.blocks[0].heads, self.text_tokens + self.image_tokens, hd)
            caches = [dict(k=self.pos.new_empty(shape), v=self.pos.new_empty(shape), n=0) for _ in self.blocks]
        logits = None
        for t in range(self.image_tokens):
            if cache:
                x = self._embed(text, None, 0) if t == 0 else self._embed(None, codes[:, -1:], self.text_tokens + t - 1)
                logits = self._run(x, caches)[:, -1]
            else:
                logits = self._run(self._embed(text, codes, 0))[:, -1]
            if guidance > 0:
                cond, unc = logits[:b], logits[b:]
                logits = unc + (1 + guidance) * (cond - unc)
            probs = torch.softmax(self._filter(logits, temperature, top_k, top_p), -1)
            nxt = torch.multinomial(probs, 1, generator=generator)
            codes = torch.cat([codes, nxt.repeat(2, 1) if guidance > 0 else nxt], 1)
        return codes[:b]
