"""fastgen.distributed.sharded_knn with 2 gloo ranks spawned here: equal to one knn over
the concatenated shards on every rank; disagreeing or non-finite ranks all raise."""
import os
import socket
import tempfile

import pytest
import torch

from fastgen.ops import reference
from helpers import assert_equal_idx


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, folder, cases):
    import torch.distributed as dist
    from fastgen.distributed import sharded_knn
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        out = []
        for queries, shards, k in cases:
            try:
                out.append(tuple(sharded_knn(queries, shards[rank], k)))
            except ValueError as exc:
                out.append(str(exc))
        torch.save(out, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_knn():
    import torch.multiprocessing as mp
    q = torch.randn(45, 7)
    keys = torch.randn(61, 7)
    dup = torch.cat([keys[:10], keys[:10]])               # equal keys on both ranks: lowest global index wins
    qd = keys[torch.randint(0, 10, (30,))]
    cases = [
        (q, [keys[:23], keys[23:]], 5),
        (q, [keys[:0], keys], 3),                          # an empty shard
        (q, [keys[:2], keys[2:]], 4),                      # a shard smaller than k
        (qd, [dup[:10], dup[10:]], 2),
        (q, [keys[:5], keys[5:, :6]], 1),                  # ranks disagree on D
        (q, [keys[:5], torch.full((4, 7), float("nan"))], 1),
        (q, [keys[:3], keys[3:5]], 9),                     # k beyond all keys
        (q, [keys[:5], torch.empty(0)], 1),                # a rank with a malformed shard: no hang
    ]
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_worker, args=(_free_port(), folder, cases), nprocs=2, join=True)
        r0, r1 = (torch.load(os.path.join(folder, f"rank{r}.pt")) for r in (0, 1))
    for (queries, shards, k), (a_d, a_i), (b_d, b_i) in list(zip(cases, r0, r1))[:4]:
        assert torch.equal(a_i, b_i) and torch.equal(a_d, b_d)
        ref_d, ref_i = reference.knn_exact(queries, torch.cat(shards), k)
        assert_equal_idx(a_i, ref_i)
        assert torch.allclose(a_d.double(), ref_d, rtol=1e-6, atol=1e-6)
    for msg in (r0[4], r1[4]):
        assert isinstance(msg, str) and "ranks disagree on local_keys' D" in msg
    assert r1[5] == "queries or local_keys contain NaN or infinite values"
    assert "rank(s) [1] refused their inputs" in r0[5]
    assert "local_keys must be 2-D" in r1[7] and "rank(s) [1] refused their inputs" in r0[7]
    for msg in (r0[6], r1[6]):
        assert isinstance(msg, str) and "k=9 exceeds the 5 keys" in msg


def test_needs_a_process_group():
    from fastgen.distributed import sharded_knn
    with pytest.raises(RuntimeError, match="initialized torch.distributed"):
        sharded_knn(torch.randn(3, 2), torch.randn(4, 2))
