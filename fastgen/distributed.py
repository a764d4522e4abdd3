"""fastgen across processes (torch.distributed): searches whose keys are spread over ranks.

`sharded_knn(queries, local_keys, k)`: every rank holds the same queries and its own
shard of the keys (IMLE: the samples this rank generated). Each rank computes its exact
local top-k, the candidates' float64 distances and global indices (rank r's keys follow
those of ranks < r) are all-gathered, and every rank merges them the same way -- by
float64 distance, ties to the lowest global index -- so the answer equals one `knn` over
the shards concatenated in rank order, on every rank. The collectives move small CPU
tensors (the agreement table, N x k candidates), so the group needs a CPU-capable backend
(gloo, or a group created with backend="gloo" next to NCCL).

Timeouts. A rank waits at most `timeout_seconds()` for the others in a collective
(default 10 minutes; `fastgen ... --timeout MINUTES`, $FASTGEN_TIMEOUT_MIN, or the
init functions' timeout_s), not torch's default of a day: a rank that froze (SIGSTOP, a
hang) fails the run within that time. Every rank of a group made here keeps a
heartbeat in the group's store, so the error can say which rank(s) stopped answering
(`explain_timeout`, raised as a CollectiveTimeout); waits that may legitimately last
longer (the end of a GPNN run, where ranks finish their shares at different times) use
`wait_for_ranks`, which waits as long as the missing ranks are alive.
"""
import atexit
import datetime
import math
import os
import threading
import time

import torch
import torch.distributed as dist

from fastgen.ops import checks
from fastgen.ops.knn import Neighbours, knn
from fastgen.ops.streaming_knn import candidate_sqdist64, merge_candidates


DEFAULT_TIMEOUT_MIN = 10.0
TIMEOUT_ENV = "FASTGEN_TIMEOUT_MIN"
_timeout_min = None      # set_timeout (the command line's --timeout); None: the environment or the default
_group_timeout_s = None  # the timeout of the group made here


class CollectiveTimeout(RuntimeError):
    """A collective (or wait_for_ranks) got no answer from other ranks within the timeout."""


def _positive_minutes(value, name):
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(f"{name} must be a positive number of minutes, got {value!r}")
    return v


def set_timeout(minutes):
    """The timeout of the groups made afterwards, in minutes (`fastgen --timeout`); None
    goes back to ${TIMEOUT_ENV} or the default (10 minutes)."""
    global _timeout_min
    _timeout_min = None if minutes is None else _positive_minutes(minutes, "--timeout")


def timeout_seconds(timeout_s=None):
    """The collective timeout in seconds: timeout_s if given, else set_timeout's, else
    $FASTGEN_TIMEOUT_MIN (minutes), else DEFAULT_TIMEOUT_MIN."""
    if timeout_s is not None:
        v = float(timeout_s)
        if not (v > 0 and math.isfinite(v)):
            raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
        return v
    if _timeout_min is not None:
        return _timeout_min * 60
    env = os.environ.get(TIMEOUT_ENV, "").strip()
    if env:
        return _positive_minutes(env, f"${TIMEOUT_ENV}") * 60
    return DEFAULT_TIMEOUT_MIN * 60


def _timeout_words(t):
    return f"{t:g} s (--timeout {t / 60:.4g} min; ${TIMEOUT_ENV})"


# ---------------------------------------------------------------------- heartbeats

_HEARTBEAT = None


class _Heartbeat:
    """A thread adding 1 to the store key `fastgen/alive/RANK` every `period` seconds: a
    rank whose count stops moving is frozen, stopped or gone (a rank merely busy or slow
    keeps beating). Non-blocking store operations only (add), so it never waits on a
    key another rank has to set."""

    def __init__(self, store, rank, world_size, timeout_s):
        self.store, self.rank, self.world_size, self.timeout_s = store, rank, world_size, timeout_s
        self.period = min(5.0, max(0.05, timeout_s / 8))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fastgen-heartbeat", daemon=True)
        self._beat()
        self._thread.start()

    @staticmethod
    def key(rank):
        return f"fastgen/alive/{rank}"

    def _beat(self):
        self.store.add(self.key(self.rank), 1)

    def _run(self):
        global _HEARTBEAT
        while not self._stop.wait(self.period):
            try:
                if not dist.is_initialized():     # the group was destroyed without leave_group
                    break
                self._beat()
            except Exception:  # noqa: BLE001 -- the store is gone (group destroyed, rank 0 exited)
                break
        if _HEARTBEAT is self:                    # let go of the store
            _HEARTBEAT = None

    def counts(self, ranks):
        return [int(self.store.add(self.key(r), 0)) for r in ranks]

    def stop(self):
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=self.period + 10)


def _start_heartbeat(timeout_s):
    global _HEARTBEAT, _group_timeout_s
    _stop_heartbeat()
    _group_timeout_s = timeout_s
    if dist.get_world_size() == 1:
        return
    try:
        store = dist.distributed_c10d._get_default_store()
        _HEARTBEAT = _Heartbeat(store, dist.get_rank(), dist.get_world_size(), timeout_s)
    except Exception:  # noqa: BLE001 -- no store to beat in: timeouts still work, without names
        _HEARTBEAT = None


def _stop_heartbeat():
    global _HEARTBEAT
    hb, _HEARTBEAT = _HEARTBEAT, None
    if hb is not None:
        hb.stop()


atexit.register(_stop_heartbeat)


def _with_deadline(fn, seconds):
    """fn() in a helper thread: (True, its result) or (False, None) when it did not
    return within `seconds` (a store whose server is frozen blocks)."""
    out = []
    t = threading.Thread(target=lambda: out.append(_try(fn)), name="fastgen-probe", daemon=True)
    t.start()
    t.join(seconds)
    if not out or out[0][0] is False:
        return False, None
    return True, out[0][1]


def _try(fn):
    try:
        return True, fn()
    except Exception:  # noqa: BLE001
        return False, None


def _silent_ranks(hb):
    """The other ranks whose heartbeat did not move over ~2.5 periods; None when the store
    itself did not answer."""
    others = [r for r in range(hb.world_size) if r != hb.rank]

    def probe():
        before = hb.counts(others)
        time.sleep(2.5 * hb.period)
        return [r for r, a, b in zip(others, before, hb.counts(others)) if a == b]
    ok, silent = _with_deadline(probe, 2.5 * hb.period + 5)
    return silent if ok else None


def _is_timeout(exc):
    text = str(exc).lower()
    return "timed out" in text or "timeout" in text


def explain_timeout(exc):
    """`exc` again, or -- when it is a collective's timeout under a group made here -- a
    CollectiveTimeout saying which rank waited, for how long, and which other ranks
    stopped answering (by their heartbeats), with `exc` as its cause."""
    if isinstance(exc, CollectiveTimeout) or not isinstance(exc, RuntimeError) or not _is_timeout(exc):
        return exc
    if not (dist.is_available() and dist.is_initialized()):
        return exc
    rank, size = dist.get_rank(), dist.get_world_size()
    if size == 1:
        return exc
    hb = _HEARTBEAT
    t = _group_timeout_s
    msg = f"rank {rank}: no answer from the other ranks within " + (_timeout_words(t) if t else "the timeout")
    if hb is None:
        msg += "; one of them stopped or is stuck (its own output may say why)"
    else:
        silent = _silent_ranks(hb)
        if silent is None:
            where = ("torchrun's agent" if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
                     else "rank 0")
            msg += f"; the group's store (served by {where}) did not answer either: {where} stopped answering"
        elif silent:
            msg += (f"; rank(s) {silent} stopped answering (no heartbeat for {2.5 * hb.period:.2g} s: "
                    "frozen, stopped (SIGSTOP) or killed)")
        else:
            msg += ("; every other rank is alive (heartbeats) but did not reach this collective: one is stuck "
                    "or far slower (raise --timeout if that is expected)")
    new = CollectiveTimeout(msg)
    new.__cause__ = exc
    return new


class _named_timeouts:
    """Re-raises a collective's timeout inside as explain_timeout's CollectiveTimeout."""

    def __enter__(self):
        return self

    def __exit__(self, typ, exc, tb):
        if exc is not None and isinstance(exc, RuntimeError):
            new = explain_timeout(exc)
            if new is not exc:
                raise new from exc
        return False


_WAITS = 0


def wait_for_ranks(tag="wait", failed=False, poll=0.2):
    """Blocks until every rank of the default group has called wait_for_ranks(tag) (the
    same number of times): a barrier through the store, without a deadline while the ranks
    not there yet are alive, so a rank that finishes its share early waits for the slowest
    however long its share takes. A missing rank whose heartbeat stops for the timeout
    raises a CollectiveTimeout naming it, on every rank waiting. failed=True: this rank
    failed; it says so and returns at once, and the waiting ranks raise a RuntimeError
    naming it. Outside a group made here (no heartbeats) it returns at once: the caller's
    barrier then does the waiting."""
    global _WAITS
    hb = _HEARTBEAT
    if hb is None or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    _WAITS += 1
    key = f"fastgen/arrived/{tag}/{_WAITS}/"
    store, rank, size = hb.store, hb.rank, hb.world_size
    timeout = hb.timeout_s
    with _named_timeouts():
        store.add(key + str(rank), 2 if failed else 1)
        if failed:
            return
        now = time.monotonic()
        seen = {r: (c, now) for r, c in zip(range(size), hb.counts(range(size)))}
        while True:
            state = [int(store.add(key + str(r), 0)) for r in range(size)]
            bad = [r for r in range(size) if state[r] == 2]
            if bad:
                raise RuntimeError(f"rank(s) {bad} failed before finishing their share (their own errors say "
                                   f"why); rank {rank} stops too")
            missing = [r for r in range(size) if state[r] == 0]
            if not missing:
                return
            now = time.monotonic()
            for r, c in zip(missing, hb.counts(missing)):
                if c != seen[r][0]:
                    seen[r] = (c, now)
            gone = [r for r in missing if now - seen[r][1] > timeout]
            if gone:
                raise CollectiveTimeout(f"rank {rank}: no answer from rank(s) {gone} within "
                                        f"{_timeout_words(timeout)}; they stopped answering (no heartbeat: frozen, "
                                        "stopped (SIGSTOP) or killed) before finishing their share")
            time.sleep(min(poll, hb.period))


def _all_gather(t, group):
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    with _named_timeouts():
        dist.all_gather(out, t.contiguous(), group=group)
    return out


def init_from_env(backend=None, timeout_s=None):
    """Joins the process group torchrun describes (WORLD_SIZE > 1 in the environment).
    backend: None = nccl when CUDA is available, else gloo; IMLE asks for gloo (its merges
    move small CPU tensors). timeout_s: how long a collective waits for the other ranks
    (None: timeout_seconds(), 10 minutes unless --timeout or $FASTGEN_TIMEOUT_MIN say
    otherwise). Returns (rank, world size, created: whether this call made the group);
    (0, 1, False) when not launched by torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, False
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    t = timeout_seconds(timeout_s)
    import_dynamo_first()
    # a bounded timeout: a frozen rank fails the run in minutes, not in torch's default
    # day; the long waits (a GPNN run's end) go through wait_for_ranks instead
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=t))
    global _MADE_HERE
    _MADE_HERE = True
    _start_heartbeat(t)
    share_cores()
    return dist.get_rank(), dist.get_world_size(), True


def rank_threads(threads, cores, local_ranks):
    """The thread count of one of `local_ranks` processes on a machine of `cores` cores that
    asked for `threads`: at most its share of the cores (at least 1), so that ranks x
    threads does not exceed the cores -- threads waiting for a core make every parallel
    region wait for its slowest thread."""
    return max(1, min(int(threads), int(cores) // max(1, int(local_ranks))))


def share_cores():
    """Caps this rank's torch threads at its share of the machine's cores (torchrun's
    LOCAL_WORLD_SIZE ranks on this machine) and says so on stderr; returns the count."""
    import sys
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    before = torch.get_num_threads()
    n = rank_threads(before, cores, local)
    if n != before:
        torch.set_num_threads(n)
    rank = os.environ.get("RANK", "0")
    print(f"fastgen: rank {rank} of {os.environ.get('WORLD_SIZE', '1')}: {n} thread{'s' if n != 1 else ''} "
          f"({cores} cores, {local} ranks on this machine" + (f"; capped from {before}" if n != before else "")
          + ")", file=sys.stderr, flush=True)
    return n


_MADE_HERE = False     # whether init_from_env made the current group (leave_group ends only that)


def leave_group():
    """Destroys the group init_from_env made, if it is still alive; a group the caller
    made is left alone. Joins gloo's worker threads (see import_dynamo_first)."""
    global _MADE_HERE
    if _MADE_HERE and dist.is_initialized():
        _stop_heartbeat()
        dist.destroy_process_group()
    _MADE_HERE = False


def init_tcp(rank, world_size, port, timeout_s=None):
    """Joins a gloo group on 127.0.0.1:port (processes spawned here, not by torchrun:
    tests, local multi-process runs), dynamo imported first (import_dynamo_first).
    timeout_s: as init_from_env's (None: timeout_seconds())."""
    t = timeout_seconds(timeout_s)
    import_dynamo_first()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=t))
    _start_heartbeat(t)


def import_dynamo_first():
    """Imports torch._dynamo before a process group exists. torch 2.13's dynamo, imported
    later (the first torch.optim optimizer does it), keeps references to the live group, so
    destroy_process_group() cannot free it and gloo's worker threads outlive the command;
    one of them may then drop a collective's tensor during interpreter shutdown and abort
    the process (SIGABRT, "terminate called without an active exception") after all its
    work was done -- about one 2-process torchrun run in twenty. Imported first, dynamo
    never sees the group, and fastgen.cli's leave_process_group joins those threads."""
    import torch._dynamo  # noqa: F401


def world(group=None):
    """(rank, world size) of the default group or `group`; (0, 1) outside torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def merge_across_ranks(dist64, gidx, k, group=None):
    """The k best of every rank's candidates: dist64 (N, k) float64 and gidx (N, k) int64
    global indices (-1 with inf: none), each rank's holding lower indices than the next
    rank's. Returns the same (dist64, gidx) on every rank (ties to the lowest index)."""
    device = dist64.device
    d, i = merge_candidates(_all_gather(dist64.cpu(), group), _all_gather(gidx.cpu(), group), k)
    return d.to(device), i.to(device)


def all_sum(value, group=None):
    """An int or float summed over the ranks (returned as a Python number)."""
    if world(group)[1] == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    with _named_timeouts():
        dist.all_reduce(t, group=group)
    return type(value)(t.item())


def sharded_knn(queries, local_keys, k=1, group=None, *, backend="auto", precision="fp32"):
    """The k nearest keys of `queries` over all ranks' `local_keys`.

    Args:
        queries: (N, D), the same on every rank.
        local_keys: (M_r, D) this rank's shard (M_r may be 0 on some ranks), the same dtype
            and D on every rank.
        k: 1 <= k <= sum of M_r.
        group: the process group (default: the world).
        backend, precision: of the local search (fastgen.ops.knn).

    Returns:
        Neighbours(dist (N, k) float32 ascending, idx (N, k) int64 global indices), the
        same on every rank. Disagreeing ranks (D, dtype, N, k) raise a ValueError on every
        rank, before any search.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("sharded_knn needs an initialized torch.distributed process group "
                           "(torchrun, or init_process_group); use fastgen.ops.knn in one process")
    rank, world_size = world(group)
    # Every rank checks its own inputs, but raises only after the first collective, so a
    # rank with bad input cannot leave the others waiting in a collective it never joins.
    error = None
    try:
        checks.points(queries, "queries", ndims=(2,))
        checks.points(local_keys, "local_keys", ndims=(2,))
        checks.positive_int(k, "k")
        checks.precision(precision)
        checks.resolve_backend(backend, local_keys.device, precision)
        if not (bool(torch.isfinite(local_keys).all()) and bool(torch.isfinite(queries).all())):
            raise ValueError("queries or local_keys contain NaN or infinite values")
        mine = torch.tensor([local_keys.shape[0], local_keys.shape[1], queries.shape[0], queries.shape[1],
                             checks.FLOAT_DTYPES.index(local_keys.dtype),
                             checks.FLOAT_DTYPES.index(queries.dtype), k, 1], dtype=torch.long)
    except (ValueError, TypeError, RuntimeError) as exc:
        error = exc
        mine = torch.zeros(8, dtype=torch.long)        # column 7 = 0: this rank refused its input
    table = torch.stack(_all_gather(mine, group))     # (world, 8): what every rank must agree on
    if error is not None:
        raise error
    if not bool(table[:, 7].all()):
        bad = [r for r in range(world_size) if not table[r, 7]]
        raise ValueError(f"rank(s) {bad} refused their inputs (NaN/inf, shape, dtype, k or backend; "
                         "their own error says which)")
    for col, what in ((1, "local_keys' D"), (2, "queries' N"), (3, "queries' D"), (4, "local_keys' dtype"),
                      (5, "queries' dtype"), (6, "k")):
        if not bool((table[:, col] == table[0, col]).all()):
            raise ValueError(f"ranks disagree on {what}: {table[:, col].tolist()} (rank {rank} of {world_size})")
    checks.same_kind(queries, "queries", local_keys, "local_keys")
    sizes = table[:, 0].tolist()
    total = sum(sizes)
    if k > total:
        raise ValueError(f"k={k} exceeds the {total} keys held by all ranks together")
    n = queries.shape[0]
    offset = sum(sizes[:rank])
    kk = min(k, sizes[rank])
    d64 = torch.full((n, k), float("inf"), dtype=torch.float64)
    gidx = torch.full((n, k), -1, dtype=torch.long)
    if kk > 0 and n > 0:
        with torch.no_grad():
            _, idx = knn(queries, local_keys, kk, backend=backend, precision=precision)
            d64[:, :kk] = candidate_sqdist64(queries, local_keys, idx).cpu()
            gidx[:, :kk] = idx.cpu() + offset
    # every rank's candidates, in rank order (= ascending global index)
    d, i = merge_across_ranks(d64, gidx, k, group)
    return Neighbours(d.float().to(queries.device), i.to(queries.device))
