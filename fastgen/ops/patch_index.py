"""fastgen.ops.PatchIndex: one key set prepared for many patch_nn searches.

GPNN searches the same key patches ten times per level (and once per sample), with
query sets that change a little from one iteration to the next. A PatchIndex owns
everything that depends on the keys alone and every choice of how to search them:

- on the CPU (C++ backend, with an alpha) the keys are clustered by k-means and
  prepared once on the C++ side (torch.classes.fastgen.PatchIndex: fp32 centred copy,
  norms, bf16 copy, balls); every search then prunes exactly -- the triangle inequality
  proves which key ranges cannot change a query's (or a key's) minimum, and only the
  rest is computed (csrc/engine/pruned_passes.h);
- with `incremental` (the default where it is available) a search of a query set of
  the same size as the last recomputes only what the queries that changed can affect
  (below);
- elsewhere (CUDA/Triton, the torch reference, alpha=None) every search is the full
  two-pass sweep, with the keys expanded per batch element in chunks whose size stays
  under `max_key_bytes`.

Incremental searches. Pass 1 (column minima): a key whose closest query is unchanged
keeps its minimum unless a changed query comes closer, so only changed queries are
searched for it (starting from that minimum); keys whose closest query changed are
searched again over the unchanged queries too. Pass 2: an unchanged query whose chosen
key kept its weight keeps its answer unless one of the keys whose weight moved beats
its score (only those keys are searched, from that score); changed queries, and those
whose key's weight moved, are searched again with the last answer as a hint. The answers
are patch_nn's up to the rounding of near-equal scores (as between any two sweeps; with
precision="bf16" both are within bf16 error of the optimum).
"""
from dataclasses import dataclass, field

import torch

from fastgen import _ext
from fastgen.ops import _backend, _validate
from fastgen.ops.key_clusters import cluster_keys  # noqa: F401 (also imported from here)
from fastgen.ops.knn import knn
from fastgen.ops.patch_sweep import patch_nn_sweep


@dataclass
class PatchIndexStats:
    """What an index has done since it was built (or since `reset`)."""
    searches: int = 0          # calls to search()
    from_scratch: int = 0      # query sets (batch elements) searched in full
    incremental: int = 0       # query sets updated from the last one
    last_changed: list = field(default_factory=list)  # last call, per batch element: fraction
                                                      # of queries that changed (None: in full)
    pairs_total: int = 0       # (query, key) pairs the pruned passes covered
    pairs_computed: int = 0    # ... of which the distance was computed

    @property
    def fraction_computed(self):
        return self.pairs_computed / self.pairs_total if self.pairs_total else None


class PatchIndex:
    """(M, D) key patches prepared for repeated `patch_nn` searches with one alpha.

    Args:
        keys: (M, D) flattened key patches, float32/float16/bfloat16, M >= 1.
        alpha: as in patch_nn (> 0; 0.005 * D for GPNN's sampling in sum units), or None
            for the plain nearest neighbour.
        backend: "auto", "cpp", "triton" or "torch" (as patch_nn).
        precision: "fp32" or "bf16" cross term.
        prune: skip what provably cannot change an answer (C++ backend with an alpha).
            None: wherever available; True where it is not raises.
        incremental: searches of a same-sized query set recompute only what changed
            since the last search (needs pruning). None: wherever available.
        cluster_size: keys per k-means cluster of the pruned index (64 measured best).
        full_above: an incremental search where more than this fraction of the queries
            changed searches in full instead.
        max_key_bytes: the unpruned sweep expands the keys per batch element in chunks
            of at most this many bytes.

    `search(queries, hint=None)` returns what `patch_nn(queries, keys, alpha)` returns;
    `stats` says what the searches did; `reset()` forgets the last queries.

    The keys must not change once the index is built (it answers from copies prepared
    from them): every search refuses keys edited since -- in place (the version counter)
    or behind torch's back (keys.data, keys.numpy(): a KeysFingerprint, whose docstring
    says what it can miss) -- with a RuntimeError naming the keys.
    """

    def __init__(self, keys, alpha=0.005, *, backend="auto", precision="fp32", prune=None, incremental=None,
                 cluster_size=64, full_above=0.8, max_key_bytes=256 << 20):
        _validate.points(keys, "keys", ndims=(2,))
        if keys.shape[0] == 0:
            raise ValueError("keys is empty (0 patches)")
        self.alpha = _validate.alpha(alpha)
        _validate.precision(precision)
        _validate.flag(prune, "prune")
        _validate.flag(incremental, "incremental")
        if not (0.0 <= float(full_above) <= 1.0):
            raise ValueError(f"full_above must be in [0, 1], got {full_above!r}")
        _validate.positive_int(max_key_bytes, "max_key_bytes")
        self.backend = _backend.resolve(backend, keys.device, precision)
        can_prune = self.backend == "cpp" and self.alpha is not None
        if prune and not can_prune:
            raise ValueError("prune=True needs the cpp backend (CPU tensors, extension built) and an alpha; "
                             f"this index runs backend={self.backend!r} with alpha={self.alpha}")
        self.pruned = can_prune if prune is None else bool(prune)
        if incremental and not self.pruned:
            raise ValueError("incremental=True needs a pruned index (cpp backend with an alpha)")
        self.incremental = self.pruned if incremental is None else bool(incremental)
        self.keys, self.precision = keys, precision
        # the index holds prepared copies of the keys: an edit of `keys` after this point
        # would leave it answering for the old keys, so every search checks the tensor's
        # version counter (bumped by every in-place torch op) and a fingerprint of its
        # values (writes the counter does not see: keys.data, keys.numpy()) and refuses
        self._keys_version = keys._version
        self._keys_print = KeysFingerprint(keys)
        self.full_above = float(full_above)
        self.max_key_bytes = int(max_key_bytes)
        self._c = None
        if self.pruned:
            sorted_keys, offsets, order = cluster_keys(keys, cluster_size)
            self._c = torch.classes.fastgen.PatchIndex(sorted_keys, offsets, order, precision)
            self._positions = self._c.positions()
        self.reset()

    def __repr__(self):
        mode = "incremental" if self.incremental else "pruned" if self.pruned else "sweep"
        return (f"PatchIndex(keys={tuple(self.keys.shape)}, alpha={self.alpha}, backend={self.backend!r}, "
                f"precision={self.precision!r}, mode={mode!r})")

    def reset(self):
        """Forget the last queries (the next search is from scratch) and zero `stats`."""
        self._states = None
        self._count = PatchIndexStats()
        self._pairs0 = self._c.pairs() if self._c is not None else (0, 0)

    @property
    def stats(self):
        s = PatchIndexStats(**{k: getattr(self._count, k) for k in ("searches", "from_scratch", "incremental")},
                            last_changed=list(self._count.last_changed))
        if self._c is not None:
            total, computed = self._c.pairs()
            s.pairs_total, s.pairs_computed = total - self._pairs0[0], computed - self._pairs0[1]
        return s

    def search(self, queries, hint=None):
        """idx (N,) or (B, N) int64 into the keys: per query the key minimising
        ||q - k||^2 / (alpha + min_q' ||q' - k||^2) (the plain nearest key for alpha=None).

        hint: optional int64 (N,) or (B, N) key indices, per query a likely answer (GPNN
        passes the previous iteration's); the pruned search starts each query's threshold
        there, so less is computed. The answer does not depend on it."""
        _validate.points(queries, "queries")
        if self.keys._version != self._keys_version:
            raise RuntimeError("the keys of this PatchIndex were modified in place after it was built; "
                               "its prepared copy is stale: build a new PatchIndex (or pass keys.clone())")
        why = self._keys_print.changed(self.keys)
        if why:
            raise RuntimeError(f"the keys of this PatchIndex changed after it was built ({why}; a write through "
                               "keys.data, keys.numpy() or another alias that the version counter does not see); "
                               "its prepared copy is stale: build a new PatchIndex (or pass keys.clone())")
        _validate.same_kind(queries, "queries", self.keys, "keys")
        squeeze = queries.dim() == 2
        q3 = queries.unsqueeze(0) if squeeze else queries
        h2 = None if hint is None else _validate.hint(hint, q3, self.keys.shape[0], squeeze)
        # what this search did, counted only once it has succeeded
        changed = []
        if not self.pruned:
            idx = self._sweep(q3)
            changed = [None] * q3.shape[0]
        elif not self.incremental:
            idx = self._c.search(q3.contiguous(), self.alpha, h2)
            changed = [None] * q3.shape[0]
        else:
            idx = self._incremental(q3, h2, changed)
        self._count.searches += 1
        self._count.from_scratch += sum(c is None for c in changed)
        self._count.incremental += sum(c is not None for c in changed)
        self._count.last_changed = changed
        return idx[0] if squeeze else idx

    # ------------------------------------------------------------------ the sweep

    def _sweep(self, q3):
        bsz = q3.shape[0]
        flat = self.keys
        chunk = max(1, self.max_key_bytes // max(1, flat.numel() * flat.element_size()))
        if bsz == 0:
            return torch.empty(q3.shape[:2], dtype=torch.long, device=q3.device)
        if self.alpha is None:   # the plain nearest neighbour: one knn, keys never expanded
            idx = knn(q3.reshape(-1, q3.shape[-1]), flat, 1, backend=self.backend, precision=self.precision).idx
            return idx.view(q3.shape[:2])
        return torch.cat([patch_nn_sweep(q3[i:i + chunk], flat.expand(min(chunk, bsz - i), -1, -1), self.alpha,
                                         self.backend, self.precision)
                          for i in range(0, bsz, chunk)])

    # ------------------------------------------------------------------ incremental searches

    def _incremental(self, q3, h2, changed):
        """Per batch element an update or a full search; appends to `changed` the fraction
        of queries that changed (None: searched in full)."""
        if self._states is None or len(self._states) != q3.shape[0]:
            self._states = [None] * q3.shape[0]
        out = []
        for b in range(q3.shape[0]):
            q = q3[b].contiguous()
            st = self._states[b]
            hb = None if h2 is None else h2[b].contiguous()
            if st is not None and st["queries"].shape == q.shape and q.shape[0] > 0:
                # (no finiteness pass here: a query with NaN/inf differs from its last
                # value, so it always reaches a C++ pass, which checks what it is given)
                moved_rows = (q != st["queries"]).any(1)
                frac = moved_rows.float().mean().item()
                if frac <= self.full_above:
                    self._states[b] = self._update(q, moved_rows, st)
                    changed.append(frac)
                    out.append(self._states[b]["idx"])
                    continue
                hb = st["idx"] if hb is None else hb
            self._states[b] = self._full(q, hb)
            changed.append(None)
            out.append(self._states[b]["idx"])
        return torch.stack(out) if out else torch.empty(q3.shape[:2], dtype=torch.long)

    def _weights(self, colmin):
        return (colmin + self.alpha).reciprocal_()

    def _full(self, q, hint):
        colmin, colarg = self._c.column_min(q, None, None)
        if q.shape[0] == 0:                     # nothing covers any key (infinite minima)
            idx, score = torch.empty(0, dtype=torch.long), torch.empty(0)
        else:
            idx, score = self._c.weighted_argmin(q, self._weights(colmin), hint, None, None, None)
        return {"queries": q.clone(), "colmin": colmin, "colarg": colarg, "idx": idx, "score": score}

    def _update(self, q, changed, st):
        # colmin/colarg/weights are over sorted-key positions (the C++ index's key space)
        inf = float("inf")
        ci = torch.nonzero(changed).flatten()
        ui = torch.nonzero(~changed).flatten()
        old_colmin, old_colarg = st["colmin"], st["colarg"]
        # keys whose closest query changed (or that had none): their minimum over the
        # unchanged queries is unknown, every other key's is its old minimum
        lost = (old_colarg < 0) | changed[old_colarg.clamp(min=0)]
        colmin, arg = self._c.column_min(q[ci], torch.where(lost, inf, old_colmin), None)
        colarg = _lift(arg, ci, old_colarg)
        # a lost key that a changed query now covers at least as well as its old minimum
        # (a lower bound of the unchanged queries' minimum) is settled already
        lost &= colmin > old_colmin
        if ui.numel() and bool(lost.any()):
            kl = torch.nonzero(lost).flatten()
            cm_l, arg_l = self._c.column_min(q[ui], colmin[kl].contiguous(), kl)
            colmin[kl] = cm_l
            colarg[kl] = _lift(arg_l, ui, colarg[kl])
        weights = self._weights(colmin)
        moved = colmin != old_colmin                      # keys whose weight changed
        idx, score = st["idx"].clone(), st["score"].clone()
        redo = changed | moved[self._position(st["idx"])]
        ri = torch.nonzero(redo).flatten()
        if ri.numel():
            idx[ri], score[ri] = self._c.weighted_argmin(q[ri], weights, st["idx"][ri].contiguous(), None, None, None)
        si = torch.nonzero(~redo).flatten()
        if si.numel() and bool(moved.any()):
            km = torch.nonzero(moved).flatten()
            idx[si], score[si] = self._c.weighted_argmin(q[si], weights, None, st["score"][si].contiguous(),
                                                         st["idx"][si].contiguous(), km)
        # only the changed rows of the stored copy need writing (not a new N x D copy)
        st["queries"][ci] = q[ci]
        return {"queries": st["queries"], "colmin": colmin, "colarg": colarg, "idx": idx, "score": score}

    def _position(self, ids):
        """Original key ids -> sorted-key positions."""
        return self._positions[ids]


class KeysFingerprint:
    """A cheap check that a (M, D) tensor still holds the values it held when this was
    made: its shape, dtype and device; `sample` elements at evenly spaced positions,
    compared exactly; and four float64 sums -- of the elements, of their squares, and
    weighted by row number and by column number -- compared within 1e-12 of the sums of
    magnitudes (reduction order may differ from call to call).

    What it can miss: a change that touches no sampled element and keeps all four sums
    within that tolerance: an edit far below the values' scale (about 1e-12 relative to
    the whole tensor's sum, e.g. a last-bit change of one element), or edits built to
    cancel in every sum (say two rows swapped together with two columns, off the sample).
    Any ordinary edit -- rows overwritten, scaled, shifted, swapped, one element changed by
    a visible amount -- is caught. Cost: one float64 pass over the tensor per check (in
    row blocks: no full float64 copy), 1-2 ms for 4096 x 147 keys on one CPU core: small
    next to a search."""

    def __init__(self, t, sample=4096):
        self.shape, self.dtype, self.device = tuple(t.shape), t.dtype, t.device
        n = t.numel()
        pos = torch.unique(torch.linspace(0, max(n - 1, 0), min(n, int(sample))).round().long())
        cols = max(1, t.shape[1]) if t.dim() == 2 else 1
        self._flat = pos.to(t.device)
        self._rows, self._cols = (pos // cols).to(t.device), (pos % cols).to(t.device)
        self._sample = self._take(t).clone()
        self._sums, scale = self._totals(t, with_scale=True)
        self._tol = scale * 1e-12

    def _take(self, t):
        """The sampled elements' bits (compared exactly: NaN equals itself, -0.0 is not 0.0)."""
        t = t.detach()
        if t.is_contiguous():
            x = t.view(-1).index_select(0, self._flat)
        else:
            x = t[self._rows, self._cols] if t.dim() == 2 else t.reshape(-1)[self._flat]
        return x.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])

    @staticmethod
    def _totals(t, with_scale=False, block_elements=1 << 22):
        t = t.detach()
        t2 = t if t.dim() == 2 else t.reshape(-1, 1)
        m, d = t2.shape
        dev = t2.device
        acc = torch.zeros(4, dtype=torch.float64, device=dev)
        scale = torch.zeros(4, dtype=torch.float64, device=dev)
        wc = torch.arange(1, d + 1, dtype=torch.float64, device=dev)
        step = max(1, block_elements // max(1, d))
        for s in range(0, m, step):
            x = t2[s:s + step].double()          # a contiguous float64 block
            wr = torch.arange(s + 1, s + x.shape[0] + 1, dtype=torch.float64, device=dev)
            rows, flat = x.sum(1), x.view(-1)
            sq = torch.dot(flat, flat)
            acc += torch.stack([rows.sum(), sq, wr @ rows, x.sum(0) @ wc])
            if with_scale:
                ax = x.abs_()
                scale += torch.stack([ax.sum(), sq, wr @ ax.sum(1), ax.sum(0) @ wc])
        return acc, scale

    def changed(self, t):
        """'' when `t` passes the check, else a few words saying what differs."""
        if tuple(t.shape) != self.shape or t.dtype != self.dtype or t.device != self.device:
            return (f"now {tuple(t.shape)} {t.dtype} on {t.device}, built from {self.shape} {self.dtype} "
                    f"on {self.device}")
        if not torch.equal(self._take(t), self._sample):
            return "sampled values differ"
        if bool(((self._totals(t)[0] - self._sums).abs() > self._tol).any()):
            return "checksums differ"
        return ""


def _lift(arg, ids, fallback):
    """Query positions in a subset (-1: none) -> ids[arg], fallback where -1."""
    out = fallback.clone()
    hit = arg >= 0
    out[hit] = ids[arg[hit]]
    return out


def prune_stats():
    """((query, key) pairs in all pruned patch_nn searches of this process, pairs whose
    distance was computed); computed / total is the fraction of the work done. One
    index's own counts are `PatchIndex.stats`."""
    info = _ext.build_info() if _ext.CPP_AVAILABLE else {}
    return info.get("patch_nn_pairs_total", 0), info.get("patch_nn_pairs_computed", 0)
