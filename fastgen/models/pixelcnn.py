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

Conditioning: class labels (an embedding added to every position) and/or a spatial
map (B, C_cond, H, W) -- e.g. VQ-VAE-2's top codes upsampled to the bottom map -- added
through a 1x1 convolution at each position (the map is known in full before sampling,
so it may look anywhere).

Sampling is incremental (`sample`): the vertical features of row i depend only on code
rows < i, so each layer computes them once per row, from the rows of the layer below it
keeps; the horizontal features of (i, j) need only that position's window of the row, so
one new code costs one position of every layer instead of a forward pass over the map.
`sample_naive` reruns the whole network for every position (what public VQ-VAE-2 code
does); both draw the same codes for the same generator (tests/test_vqvae2.py).

PixelSNAIL-style context (Chen et al. 2018, the prior of the public VQ-VAE-2 code):
`attention="every"` puts a causal self-attention block after every gated layer, on the
horizontal stack, so each position's features read every earlier position's -- the
receptive field is the whole past, not the ~layers x kernel/2 window of the convolutions
(a 16x16 map's last position sees 90 of its 255 past codes with 8 layers of kernel 3,
all 255 with attention). `dropout` drops the gated horizontal features in training.
Both sample incrementally: each attention block keeps its keys and values.
"""
import contextlib

import torch
import torch.nn.functional as F
from torch import nn


class CausalAttention(nn.Module):
    """Self-attention over the raster order on the horizontal stack. Position p attends to
    the features of positions <= p, which depend only on codes before them, so causality
    holds. For sampling, `step` takes one new position and keeps the keys and values seen
    so far.

    context=True (the blocks of attention="every"): the keys and values also read the code
    *embeddings shifted one step along the raster order* (position p' carries code p' - 1),
    as PixelSNAIL's attention reads its input. Without them the last codes of a row would
    reach the next row's early positions through no feature at all: the features of
    positions before p depend on code q < p only if they lie right of q in its row or in
    the convolutions' window below it."""

    def __init__(self, dim, heads=4, context=False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by the attention heads ({heads})")
        self.heads, self.context = heads, context
        self.norm = nn.LayerNorm(dim)
        if context:
            self.q = nn.Linear(dim, dim)
            self.kv = nn.Linear(2 * dim, 2 * dim)
        else:
            self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def _qkv(self, x, ctx):                  # (B, n, d) [, (B, n, d)] -> three (B, heads, n, d / heads)
        b, n, d = x.shape
        x = self.norm(x)
        if self.context:
            qkv = (self.q(x), *self.kv(torch.cat([x, ctx], -1)).chunk(2, -1))
        else:
            qkv = self.qkv(x).chunk(3, -1)
        return [t.view(b, n, self.heads, d // self.heads).transpose(1, 2) for t in qkv]

    @staticmethod
    def shifted(embedded):
        """(B, d, H, W) code embeddings -> (B, H*W, d), position p holding code p - 1's (zeros at 0)."""
        x = embedded.flatten(2).transpose(1, 2)
        return F.pad(x, (0, 0, 1, 0))[:, :-1]

    def forward(self, h, ctx=None):          # h (B, d, H, W); ctx: shifted(...) when context -> (B, d, H, W)
        b, d, H, W = h.shape
        x = h.flatten(2).transpose(1, 2)
        q, k, v = self._qkv(x, ctx)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, H * W, d)
        return h + self.out(a).transpose(1, 2).reshape(b, d, H, W)

    def step(self, h_pos, cache, ctx_pos=None):
        """h_pos (B, d, 1, 1); ctx_pos (B, 1, d): the previous code's embedding; cache: dict
        of k, v (B, heads, n, d / heads)."""
        x = h_pos.flatten(2).transpose(1, 2)
        q, k, v = self._qkv(x, ctx_pos)
        if "k" in cache:
            k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
        cache["k"], cache["v"] = k, v
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(x.shape)
        return h_pos + self.out(a).transpose(1, 2).reshape(h_pos.shape)


def _gate(t):
    a, b = t.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class GatedLayer(nn.Module):
    def __init__(self, dim, kernel, first, num_classes=None, cond_channels=None, dropout=0.0):
        super().__init__()
        self.dim, self.half, self.first = dim, kernel // 2, first
        self.drop = nn.Dropout(dropout)
        self.v_conv = nn.Conv2d(dim, 2 * dim, (self.half + 1, kernel))
        self.v_to_h = nn.Conv2d(2 * dim, 2 * dim, 1)
        self.h_conv = nn.Conv2d(dim, 2 * dim, (1, self.half + 1))
        self.h_out = nn.Conv2d(dim, dim, 1)
        self.cond = nn.Embedding(num_classes, 4 * dim) if num_classes else None
        self.cond_map = nn.Conv2d(cond_channels, 4 * dim, 1) if cond_channels else None

    def _conditioned(self, v_feat, h_feat, labels, cmap):
        """v_feat, h_feat plus the label and map terms (cmap: the map at these positions)."""
        if self.cond is not None:
            cv, ch = self.cond(labels)[:, :, None, None].chunk(2, dim=1)
            v_feat, h_feat = v_feat + cv, h_feat + ch
        if self.cond_map is not None:
            cv, ch = self.cond_map(cmap).chunk(2, dim=1)
            v_feat, h_feat = v_feat + cv, h_feat + ch
        return v_feat, h_feat

    def forward(self, v, h, labels=None, cmap=None):
        H, W = v.shape[-2:]
        s = int(self.first)   # the first layer's shift: strictly above / strictly left
        v_in = F.pad(v, (self.half, self.half, self.half + s, 0))[:, :, :H + self.half]
        h_in = F.pad(h, (self.half + s, 0, 0, 0))[:, :, :, :W + self.half]
        v_feat = self.v_conv(v_in)
        h_feat = self.h_conv(h_in) + self.v_to_h(v_feat)
        # the map's 1x1 term goes to v_feat after v_to_h has read it, as in step_* below
        v_feat, h_feat = self._conditioned(v_feat, h_feat, labels, cmap)
        h_new = self.h_out(self.drop(_gate(h_feat)))
        if not self.first:   # the first layer's h input holds the current position itself
            h_new = h_new + h
        return _gate(v_feat), h_new

    # -- incremental sampling: the same arithmetic on one row / one position ------------

    def step_row(self, v_rows, i, zero, labels, cmap_row):
        """Vertical features of row i from the rows of this layer's v input (a list, row r
        at index r; `zero`, an all-zero row, stands for the rows above the map):
        (v_feat_pre (B, 2d, 1, W) before conditioning, gated v out row (B, d, 1, W))."""
        s = int(self.first)
        win = torch.cat([v_rows[r] if r >= 0 else zero for r in range(i - self.half - s, i - s + 1)], 2)
        pre = self.v_conv(F.pad(win, (self.half, self.half, 0, 0)))   # (B, 2d, 1, W)
        v_feat, _ = self._conditioned(pre, pre, labels, cmap_row)
        return pre, _gate(v_feat)

    def step_pos(self, h_row, j, pre_row, labels, cmap_pos, h_self):
        """h output at (i, j) of this layer from its h input row (B, d, 1, W) -- only
        columns <= j are read --, the row's pre-conditioning vertical features, and the
        input at (i, j) itself (the residual)."""
        s = int(self.first)
        lo = j - self.half - s
        win = h_row[..., max(lo, 0):j - s + 1]
        if lo < 0:
            win = F.pad(win, (-lo, 0, 0, 0))
        h_feat = self.h_conv(win) + self.v_to_h(pre_row[..., j:j + 1])
        _, h_feat = self._conditioned(pre_row[..., j:j + 1], h_feat, labels, cmap_pos)
        h_new = self.h_out(self.drop(_gate(h_feat)))
        return h_new if self.first else h_new + h_self


class GatedPixelCNN(nn.Module):
    """Prior over (B, H, W) maps of codes in [0, num_codes).

    Args:
        num_codes: code vocabulary K.
        code_shape: (H, W) of the maps (kept in the config; any size works).
        dim: channels of the stacks; layers: gated layers; kernel: odd kernel width.
        num_classes: enables class conditioning (labels (B,) in [0, num_classes)).
        cond_channels: enables conditioning on a map (B, cond_channels, H, W).
        attention: False (none), True or "head" (one causal self-attention block before the
            head), "every" (one after every gated layer: the PixelSNAIL-style prior).
        dropout: dropout on the gated horizontal features in training (0: none).
    """

    def __init__(self, num_codes, code_shape, dim=64, layers=6, kernel=3, num_classes=None, cond_channels=None,
                 attention=False, dropout=0.0):
        super().__init__()
        if attention not in (False, True, "head", "every", "none"):
            raise ValueError(f"attention must be False, True/'head' or 'every', got {attention!r}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if kernel < 3 or kernel % 2 == 0:
            raise ValueError(f"kernel must be an odd number >= 3, got {kernel}")
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        self.config = dict(num_codes=num_codes, code_shape=tuple(code_shape), dim=dim, layers=layers,
                           kernel=kernel, num_classes=num_classes, cond_channels=cond_channels, attention=attention,
                           **({"dropout": dropout} if dropout else {}))
        self.cond_channels = cond_channels
        every = attention == "every"
        self.attention = CausalAttention(dim) if attention in (True, "head") else None
        # one block per gated layer, on its h output (None: no attention after that layer)
        self.layer_attention = nn.ModuleList(CausalAttention(dim, context=True) for _ in range(layers)) if every else None
        self.num_codes, self.code_shape, self.num_classes = num_codes, tuple(code_shape), num_classes
        self.embed = nn.Embedding(num_codes, dim)
        self.layers = nn.ModuleList(GatedLayer(dim, kernel, first=(i == 0), num_classes=num_classes,
                                               cond_channels=cond_channels, dropout=dropout) for i in range(layers))
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(dim, dim, 1), nn.ReLU(), nn.Conv2d(dim, num_codes, 1))

    def _check_map(self, cmap, n, shape):
        if (cmap is None) != (self.cond_channels is None):
            raise ValueError("cond (a conditioning map) is required for a map-conditional model "
                             "(cond_channels set) and not accepted otherwise")
        if cmap is not None and (not isinstance(cmap, torch.Tensor) or tuple(cmap.shape) != (n, self.cond_channels) + tuple(shape)):
            raise ValueError(f"cond must be ({n}, {self.cond_channels}, {shape[0]}, {shape[1]}), "
                             f"got {tuple(getattr(cmap, 'shape', ()))}")

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

    def logits(self, codes, labels=None, cond=None):
        """(B, H, W) codes -> (B, K, H, W) logits of p(c_ij | c_<ij)."""
        self._check(codes, labels)
        self._check_map(cond, codes.shape[0], codes.shape[1:])
        x = self.embed(codes.long()).permute(0, 3, 1, 2)
        v = h = x
        ctx = CausalAttention.shifted(x) if self.layer_attention is not None else None
        for li, layer in enumerate(self.layers):
            v, h = layer(v, h, labels, cond)
            if self.layer_attention is not None:
                h = self.layer_attention[li](h, ctx)
        if self.attention is not None:
            h = self.attention(h)
        return self.head(h)

    def pack(self, codes, labels):
        """(B, H, W) codes and their (B,) class labels -> (B, H*W + 1) rows, the label last:
        what a class-conditional prior trains on (the training loop iterates one tensor)."""
        self._check(codes, labels)
        return torch.cat([codes.flatten(1).long(), labels.long()[:, None]], 1)

    def unpack(self, rows):
        n = self.code_shape[0] * self.code_shape[1]
        if not isinstance(rows, torch.Tensor) or rows.dim() != 2 or rows.shape[1] != n + 1:
            raise ValueError(f"packed rows must be (B, {n + 1}) (codes then the label), got "
                             f"{tuple(getattr(rows, 'shape', ()))}")
        return rows[:, :n].reshape(-1, *self.code_shape), rows[:, n]

    def labels_for(self, n, device=None, offset=0):
        """Labels cycling through the classes (0, 1, ..., 0, 1, ...) for n samples of a
        class-conditional model; None for an unconditional one."""
        if self.num_classes is None:
            return None
        return (torch.arange(n, device=device) + offset) % self.num_classes

    def forward(self, codes, labels=None, cond=None):
        """dict(loss = mean cross-entropy in nats per code, nll (B,) nats per map). A
        class-conditional model also takes packed rows (`pack`) in place of (codes, labels)."""
        if self.num_classes is not None and labels is None and isinstance(codes, torch.Tensor) and codes.dim() == 2:
            codes, labels = self.unpack(codes)
        logits = self.logits(codes, labels, cond)
        ce = F.cross_entropy(logits, codes.long(), reduction="none")
        return dict(loss=ce.mean(), nll=ce.detach().flatten(1).sum(1))

    def _sample_args(self, n, labels, cond, temperature, shape, device):
        device = device or self.embed.weight.device
        H, W = shape or self.code_shape
        if not 0 < temperature < float("inf"):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
        if labels is not None:
            self._check(torch.zeros(n, 1, 1, dtype=torch.long, device=device), labels)
        elif self.num_classes is not None:
            raise ValueError("labels are required for a class-conditional model (num_classes set)")
        self._check_map(cond, n, (H, W))
        return device, H, W

    @staticmethod
    def _draw(logits, temperature, generator):
        # minus the largest logit first: a tiny temperature is a greedy draw, not inf - inf = nan
        logits = logits.float()
        probs = torch.softmax((logits - logits.amax(1, keepdim=True)) / temperature, dim=1)
        return torch.multinomial(probs, 1, generator=generator)[:, 0]

    @contextlib.contextmanager
    def _evaluating(self):
        """Sampling runs in eval mode (no dropout) whatever mode the caller left, and restores it."""
        was = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was)

    @torch.no_grad()
    def sample(self, n, labels=None, generator=None, device=None, temperature=1.0, shape=None, cond=None):
        """n code maps drawn position by position, incrementally (module docstring): each
        layer's vertical features once per row, its horizontal features once per position."""
        with self._evaluating():
            return self._sample(n, labels, generator, device, temperature, shape, cond)

    def _sample(self, n, labels, generator, device, temperature, shape, cond):
        device, H, W = self._sample_args(n, labels, cond, temperature, shape, device)
        codes = torch.zeros(n, H, W, dtype=torch.long, device=device)
        attn_cache = {}
        layer_caches = [{} for _ in self.layers]
        prev = torch.zeros(n, 1, self.embed.embedding_dim, device=device)   # the previous code's embedding
        zero = torch.zeros(n, self.embed.embedding_dim, 1, W, device=device)
        # per layer, the rows of its v input kept so far: layer 0 reads the embedded code
        # rows, layer l > 0 the gated v output rows of layer l - 1
        v_inputs = [[] for _ in self.layers]
        last = len(self.layers) - 1
        for i in range(H):
            cmap_row = cond[:, :, i:i + 1] if cond is not None else None
            pres = []
            for li, layer in enumerate(self.layers):
                pre, v_out = layer.step_row(v_inputs[li], i, zero, labels, cmap_row)
                pres.append(pre)
                if li < last:
                    v_inputs[li + 1].append(v_out)
            # per layer, its h input row; row i's embeddings fill in as codes are drawn
            h_rows = [torch.zeros_like(zero) for _ in self.layers]
            for j in range(W):
                cpos = cond[:, :, i:i + 1, j:j + 1] if cond is not None else None
                for li, layer in enumerate(self.layers):
                    h = layer.step_pos(h_rows[li], j, pres[li], labels, cpos, h_rows[li][..., j:j + 1])
                    if self.layer_attention is not None:
                        h = self.layer_attention[li].step(h, layer_caches[li], prev)
                    if li < last:
                        h_rows[li + 1][..., j:j + 1] = h
                if self.attention is not None:
                    h = self.attention.step(h, attn_cache)
                c = self._draw(self.head(h)[:, :, 0, 0], temperature, generator)
                codes[:, i, j] = c
                e = self.embed(c)
                h_rows[0][..., j:j + 1] = e[:, :, None, None]
                prev = e[:, None, :]
            v_inputs[0].append(h_rows[0])
        return codes

    @torch.no_grad()
    def sample_naive(self, n, labels=None, generator=None, device=None, temperature=1.0, shape=None, cond=None):
        """The same draws as `sample`, rerunning the whole network for every position."""
        device, H, W = self._sample_args(n, labels, cond, temperature, shape, device)
        codes = torch.zeros(n, H, W, dtype=torch.long, device=device)
        with self._evaluating():
            for i in range(H):
                for j in range(W):
                    logits = self.logits(codes, labels, cond)[:, :, i, j]
                    codes[:, i, j] = self._draw(logits, temperature, generator)
        return codes
