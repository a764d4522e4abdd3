"""fastgen across processes (torch.distributed): searches whose keys are spread over ranks.

`sharded_knn(queries, local_keys, k)`: every rank holds the same queries and its own
shard of the keys (IMLE: the samples this rank generated). Each rank computes its exact
local top-k, the candidates' float64 distances and global indices (rank r's keys follow
those of ranks < r) are all-gathered, and every rank merges them the same way -- by
float64 distance, ties to the lowest global index -- so the answer equals one `knn` over
the shards concatenated in rank order, on every rank. The collectives move small CPU
tensors (the agreement table, N x k candidates), so the group needs a CPU-capable backend
(gloo, or a group created with backend="gloo" next to NCCL).
"""
import torch
import torch.distributed as dist

from fastgen.ops import _backend, _validate
from fastgen.ops.knn import Neighbours, knn
from fastgen.ops.streaming_knn import candidate_sqdist64, merge_candidates



def _all_gather(t, group):
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t.contiguous(), group=group)
    return out


def init_from_env(backend=None):
    """Joins the process group torchrun describes (WORLD_SIZE > 1 in the environment).
    backend: None = nccl when CUDA is available, else gloo; IMLE asks for gloo (its merges
    move small CPU tensors). Returns (rank, world size, created: whether this call made
    the group); (0, 1, False) when not launched by torchrun."""
    import datetime
    import os
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, False
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    import_dynamo_first()
    # long timeout: a final barrier waits for the slowest rank's share of a large run
    dist.init_process_group(backend, timeout=datetime.timedelta(hours=24))
    global _MADE_HERE
    _MADE_HERE = True
    return dist.get_rank(), dist.get_world_size(), True


_MADE_HERE = False     # whether init_from_env made the current group (leave_group ends only that)


def leave_group():
    """Destroys the group init_from_env made, if it is still alive; a group the caller
    made is left alone. Joins gloo's worker threads (see import_dynamo_first)."""
    global _MADE_HERE
    if _MADE_HERE and dist.is_initialized():
        dist.destroy_process_group()
    _MADE_HERE = False


def init_tcp(rank, world_size, port, timeout_s=300):
    """Joins a gloo group on 127.0.0.1:port (processes spawned here, not by torchrun:
    tests, local multi-process runs), dynamo imported first (import_dynamo_first)."""
    import datetime
    import_dynamo_first()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))


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
        _validate.points(queries, "queries", ndims=(2,))
        _validate.points(local_keys, "local_keys", ndims=(2,))
        _validate.positive_int(k, "k")
        _validate.precision(precision)
        _backend.resolve(backend, local_keys.device, precision)
        if not (bool(torch.isfinite(local_keys).all()) and bool(torch.isfinite(queries).all())):
            raise ValueError("queries or local_keys contain NaN or infinite values")
        mine = torch.tensor([local_keys.shape[0], local_keys.shape[1], queries.shape[0], queries.shape[1],
                             _validate.FLOAT_DTYPES.index(local_keys.dtype),
                             _validate.FLOAT_DTYPES.index(queries.dtype), k, 1], dtype=torch.long)
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
    _validate.same_kind(queries, "queries", local_keys, "local_keys")
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
