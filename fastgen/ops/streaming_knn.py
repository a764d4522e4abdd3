"""fastgen.ops.StreamingKNN: the k nearest of keys that arrive in chunks.

IMLE searches, for every data point, the nearest of many generated samples; holding all
samples at once costs O(samples x D) memory. A StreamingKNN keeps each query's best k
(distance, global index) across chunks of keys, so memory is O((N + chunk) * D + N * k)
however many keys stream past, and the samples themselves can be discarded (regenerated
from their latent codes when needed).

Exactness: each chunk goes through `knn` (float64 ranking, lowest index on ties), and the
running candidates and a chunk's are merged by their float64 distances computed directly
from the inputs, ties by global index, so the result equals one `knn` over all the keys
concatenated in the order they were added.
"""
import torch

from fastgen.ops import _backend, _validate, pruned_knn
from fastgen.ops.baselines import candidate_sqdist64  # noqa: F401 (also imported from here)
from fastgen.ops.knn import Neighbours, run_knn
from fastgen.ops.knn_plan import plan_knn


def merge_candidates(dists, idxs, k):
    """The k best of several candidate lists (N, k_i) each, given in ascending global-index
    order: a stable sort by float64 distance keeps the lowest index among equal ones."""
    d, i = torch.cat(dists, 1), torch.cat(idxs, 1)
    order = torch.sort(d, dim=1, stable=True).indices[:, :k]
    return d.gather(1, order), i.gather(1, order)


class StreamingKNN:
    """The k nearest keys of `queries` over every chunk passed to `add`.

    Args:
        queries: (N, D) float32/float16/bfloat16.
        k: neighbours per query; the keys added in total must reach k before `result`.
        backend, precision: as in `fastgen.ops.knn`.
        prune: True prunes each chunk (2-D cpp); None and False sweep (the automatic
            choice of `knn` was tuned on single calls, not on streams). When pruning, each chunk's search starts from the running k-th best
            distance of every query as its threshold: keys farther than that cannot enter
            the answer and are skipped, so a chunk with nothing better costs little.

    `add(keys, index=None)` takes a (M_i, D) chunk; its global indices continue from the
    last chunk, or are `index` (int64 (M_i,), ascending, above every earlier one: IMLE
    passes the sample numbers that survived rejection, or a rank's share of them).
    `result()` returns Neighbours(dist (N, k) float32 ascending, idx (N, k) int64 global);
    `result64()` the float64 distances, padded with (inf, -1) while fewer than k keys came.

    Ownership: the queries are copied (contiguous, N x D, detached) when the object is
    built, so the k nearest are those of the queries as they were then: an in-place edit of
    the caller's tensor afterwards (`q.add_(5)`, a write through `q.numpy()` or `q.data`)
    cannot mix two query sets in one answer. `self.queries` is that copy.
    """

    def __init__(self, queries, k=1, *, backend="auto", precision="fp32", prune=None):
        _validate.points(queries, "queries", ndims=(2,))
        _validate.positive_int(k, "k")
        _validate.finite(queries, "queries")
        # an owned copy: every chunk is searched against the same queries, whatever the
        # caller does to its tensor between two add() calls (O(N * D), like the state)
        self.queries = queries.detach().clone(memory_format=torch.contiguous_format)
        self.k = int(k)
        _validate.flag(prune, "prune")
        _validate.precision(precision)
        if prune and _backend.resolve(backend, queries.device, precision) != "cpp":
            raise ValueError("prune=True needs the cpp backend (CPU tensors, extension built); "
                             f"backend={backend!r} resolves to another: use prune=None or False")
        self.backend, self.precision, self.prune = backend, precision, prune
        self.query_block = 4096
        # planned once (fastgen.ops.knn_plan), on the first chunk that has k keys, and kept:
        # every chunk runs the same backend, path and precision
        self.plan = None
        self.seen = 0
        self._next_id = 0
        n = queries.shape[0]
        self._dist = torch.full((n, 0), float("inf"), dtype=torch.float64, device=queries.device)
        self._idx = torch.empty((n, 0), dtype=torch.long, device=queries.device)

    def add(self, keys, index=None):
        """Search one chunk of keys (M_i, D) and merge it into the running best."""
        _validate.points(keys, "keys", ndims=(2,))
        _validate.same_kind(self.queries, "queries", keys, "keys")
        m = keys.shape[0]
        if index is not None:
            if not isinstance(index, torch.Tensor) or index.dtype != torch.long or tuple(index.shape) != (m,):
                raise ValueError(f"index must be an int64 tensor of shape ({m},) (one id per key)")
            if m and (int(index[0]) < self._next_id or (m > 1 and not bool((index.diff() > 0).all()))):
                raise ValueError(f"index must be ascending and start at or above {self._next_id} "
                                 "(after every id already added)")
        if m == 0:
            return self
        kk = min(self.k, m)
        with torch.no_grad():
            idx = self._search(keys, kk)
            dist = candidate_sqdist64(self.queries, keys, idx)
        ids = idx + self._next_id if index is None else index.to(idx.device)[idx.clamp_min(0)]
        ids = ids.masked_fill(idx < 0, -1)
        # the running candidates hold lower global indices than this chunk's
        self._dist, self._idx = merge_candidates([self._dist, dist], [self._idx, ids], self.k)
        self.seen += m
        self._next_id = self._next_id + m if index is None else int(index[-1]) + 1
        return self

    def _search(self, keys, kk):
        plan = self.plan
        if plan is None:
            plan = plan_knn(self.queries, keys, kk, backend=self.backend, precision=self.precision,
                            prune=self.prune, streamed=True)
            # kept once a chunk can judge: a short chunk (M < k) plans again on the next
            # one, and so does one too small for bf16's sample (M <= k + 1 keeps bf16 as asked)
            if kk == self.k and (self.precision != "bf16" or keys.shape[0] > self.k + 1):
                self.plan = plan
        if not plan.prune:
            # query rows in blocks: the kernel's prepared copy of the queries is one block's,
            # so the peak is O((block + chunk) * D) however many queries there are
            if plan.backend != "cpp":   # the C++ sweep checks the same in its first pass
                _validate.distance_inputs(self.queries, "queries", keys, "keys")
            return torch.cat([run_knn(q, keys, kk, False, plan).idx for q in self.queries.split(self.query_block)])
        bound = None          # (pruned_knn checks the chunk: the distance-input rule, once)
        if self._dist.shape[1] == self.k:
            # the running k-th best, widened to survive fp32 rounding; kept in float64 (an fp32
            # bound of tiny-scale data underflows to 0: pruned_knn scales it with the data)
            bound = self._dist[:, -1] * (1 + 2.0 ** -20)
        return pruned_knn.pruned_knn(self.queries, keys, kk, bound=bound, precision=plan.precision)[0][1]

    def result(self):
        if self.seen < self.k:
            raise ValueError(f"k={self.k} but only {self.seen} keys were added")
        return Neighbours(self._dist.float(), self._idx.clone())

    def result64(self):
        """(dist (N, k) float64, idx (N, k) int64): what merges across processes rank by;
        entries not filled yet (fewer than k keys seen) are (inf, -1)."""
        n, have = self._dist.shape
        pad = self.k - have
        d = torch.cat([self._dist, self._dist.new_full((n, pad), float("inf"))], 1)
        i = torch.cat([self._idx, self._idx.new_full((n, pad), -1)], 1)
        return d, i
