"""fastgen.distributed.sharded_knn with 2 gloo ranks spawned here: equal to one knn over
the concatenated shards on every rank; disagreeing or non-finite ranks all raise."""
import os
import tempfile

import pytest
import torch

from fastgen.ops import reference
from helpers import assert_equal_idx, free_port, init_gloo



def _worker(rank, port, folder, cases):
    import torch.distributed as dist
    from fastgen.distributed import sharded_knn
    torch.set_num_threads(1)
    init_gloo(rank, port)
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
        mp.spawn(_worker, args=(free_port(), folder, cases), nprocs=2, join=True)
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


def _imle_search_worker(rank, port, folder, variant):
    import torch.distributed as dist
    from fastgen.models import IMLE
    torch.set_num_threads(1)
    init_gloo(rank, port)
    try:
        torch.manual_seed(0)
        x = torch.rand(37, 1, 4, 4)
        model = IMLE((1, 4, 4), z_dim=3, samples_per_point=5, chunk=16, **variant)
        info = model.search(x, generator=torch.Generator().manual_seed(7))
        torch.save((model.chosen_z, info), os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("variant", [{}, {"reject_eps": 0.85}])
def test_imle_search_split_over_two_ranks_equals_one_process(variant):
    """Each rank draws and searches its own chunks; the merged choice is the one-process
    choice on every rank (same seeds, same chosen codes)."""
    import torch.multiprocessing as mp
    from fastgen.models import IMLE
    torch.manual_seed(0)
    x = torch.rand(37, 1, 4, 4)
    model = IMLE((1, 4, 4), z_dim=3, samples_per_point=5, chunk=16, **variant)
    info = model.search(x, generator=torch.Generator().manual_seed(7))
    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(_imle_search_worker, args=(free_port(), folder, variant), nprocs=2,
                           start_method="spawn", join=True)
        for rank in range(2):
            chosen, got = torch.load(os.path.join(folder, f"rank{rank}.pt"))
            assert torch.equal(chosen, model.chosen_z)
            timeless = [{k: v for k, v in d.items() if not k.startswith("seconds")} for d in (got, info)]
            assert timeless[0] == timeless[1]
    if variant:
        assert info["rejected"] > 0


def test_imle_trains_under_torchrun_like_one_process(tmp_path):
    """`torchrun --nproc-per-node 2 -m fastgen.cli train imle`: the same run as one
    process up to float reduction order (same seeds, same chosen samples)."""
    import subprocess
    import sys
    args = ["train", "imle", "--data", "digits", "--epochs", "4", "--staleness", "2", "--batches-per-epoch", "5",
            "--samples-per-point", "3", "--threads", "1", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "fastgen.cli", *args, "--out", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "fastgen.cli", *args, "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 processes" in two.stdout
    # each rank says the thread count it ended up with: its share of the cores at most
    for r in (0, 1):
        assert f"fastgen: rank {r} of 2: 1 thread (" in two.stderr, two.stderr[-3000:]
    a = torch.load(tmp_path / "one" / "checkpoint.pt")
    b = torch.load(tmp_path / "two" / "checkpoint.pt")
    assert a["epoch"] == b["epoch"] == 4
    for name, t in a["model"].items():
        torch.testing.assert_close(b["model"][name], t, rtol=1e-4, atol=1e-5, msg=name)
    ra = [r["mean_nearest_dist"] for r in a["history"] if "mean_nearest_dist" in r]
    rb = [r["mean_nearest_dist"] for r in b["history"] if "mean_nearest_dist" in r]
    assert len(ra) == 2 and ra == pytest.approx(rb, rel=1e-4)


def _two_ranks_outcome(worker, *args, timeout=120):
    """Spawn worker(rank, port, folder, *args) on 2 gloo ranks; each saves what happened to
    it (folder/rank{r}.pt). A rank still running after `timeout` s fails the test as a hang."""
    import time

    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as folder:
        ctx = mp.start_processes(worker, args=(free_port(), folder, *args), nprocs=2, start_method="spawn",
                                 join=False)
        deadline = time.time() + timeout
        while not ctx.join(timeout=5):
            if time.time() > deadline:
                for p in ctx.processes:
                    p.terminate()
                pytest.fail("a rank hung waiting for the failed one")
        return [torch.load(os.path.join(folder, f"rank{r}.pt")) for r in range(2)]


def _outcome_worker(rank, port, folder, attempt):
    """Joins the group, runs attempt(rank, folder) and saves what came of it: "no error" or
    "Type: message" of the exception it raised."""
    import torch.distributed as dist
    torch.set_num_threads(1)
    init_gloo(rank, port)
    try:
        try:
            attempt(rank, folder)
            msg = "no error"
        except (ValueError, RuntimeError, OSError) as exc:
            msg = f"{type(exc).__name__}: {exc}"
        torch.save(msg, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _imle_search_with_a_nan_rank(rank, folder):
    from fastgen.models import IMLE
    torch.manual_seed(0)
    x = torch.rand(37, 1, 4, 4)
    model = IMLE((1, 4, 4), z_dim=3, samples_per_point=5, chunk=16)
    if rank == 1:          # this rank's generator diverged: its samples are NaN
        model.generate = lambda z, cond=None: torch.full((z.shape[0], 1, 4, 4), float("nan"))
    model.search(x, generator=torch.Generator().manual_seed(7))


def test_a_rank_failing_in_the_imle_search_fails_every_rank_clearly():
    """Before, the healthy rank waited in the merge for the failed one: it hung while that
    process lived and got gloo's "Read error ... connection closed" once it exited."""
    got = _two_ranks_outcome(_outcome_worker, _imle_search_with_a_nan_rank)
    assert got[0].startswith("RuntimeError: 1 other rank(s) failed"), got
    assert "NaN" in got[1] or "finite" in got[1], got


class _TinySharded(torch.nn.Module):
    trains_sharded = True

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(4))

    def forward(self, x, shard=None):
        if shard is not None:
            x = x[shard[0]::shard[1]]
        return {"loss": (x - self.w).square().mean()}


def _fit_with_rank0_disk_full(rank, folder):
    from fastgen.training import fit

    def evaluate():        # only rank 0 evaluates; its disk is full
        raise OSError("No space left on device")
    fit(_TinySharded(), torch.rand(16, 4), kind="tiny", out=folder, epochs=3, config={},
        evaluate=evaluate, show_progress=False, batch_size=8)


def test_rank0_failing_in_evaluate_or_save_fails_every_rank_clearly():
    """Before, the other ranks met rank 0's failure as gloo's "Connection closed by peer"
    in their next epoch's gradient all-reduce."""
    got = _two_ranks_outcome(_outcome_worker, _fit_with_rank0_disk_full)
    assert got[0] == "OSError: No space left on device", got
    assert got[1].startswith("RuntimeError: rank 0 failed while evaluating or saving epoch 1"), got


def _leaves_group_worker(rank, port, folder):
    """A torchrun-launched command's life: join from the environment, build an optimizer
    (which imports torch._dynamo), one collective, leave as fastgen.cli does. Records the
    gloo threads still alive afterwards."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    from fastgen.cli import leave_process_group
    from fastgen.distributed import init_from_env
    torch.set_num_threads(1)
    assert init_from_env(backend="gloo")[2]
    torch.optim.Adam(torch.nn.Linear(3, 2).parameters())
    t = torch.ones(3)
    torch.distributed.all_reduce(t)
    leave_process_group()
    names = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                names.append(f.read().strip())
        except OSError:        # a thread that ended meanwhile
            pass
    torch.save((t.tolist(), [n for n in names if "gloo" in n]), os.path.join(folder, f"rank{rank}.pt"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads thread names from Linux's /proc")
def test_leaving_the_group_joins_gloos_threads():
    """With torch 2.13 the group outlived destroy_process_group once an optimizer had
    imported torch._dynamo; a gloo thread alive at interpreter shutdown then aborted about
    one 2-process `torchrun ... train imle` in twenty after its work was done (SIGABRT)."""
    got = _two_ranks_outcome(_leaves_group_worker)
    for total, gloo_threads in got:
        assert total == [2.0, 2.0, 2.0]
        assert gloo_threads == [], gloo_threads


def test_leaving_spares_a_group_the_caller_made():
    """fastgen.cli.main run inside a user's script must not end the script's own group."""
    import torch.distributed as dist

    from fastgen.cli import leave_process_group
    import fastgen.distributed  # noqa: F401  (what leave_process_group consults)
    init_gloo(0, free_port(), world=1)
    try:
        leave_process_group()
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()


# ---- timeouts: a frozen rank fails the run in bounded time, named ---------------------------


def test_the_timeout_reaches_init_process_group(monkeypatch, tmp_path):
    """The group's timeout was torch's default (24 h): a frozen rank left the others waiting
    for a day. It is bounded (10 min), and --timeout, $FASTGEN_TIMEOUT_MIN or timeout_s set it."""
    import datetime

    import fastgen.distributed as fd
    from fastgen.cli import main
    seen = []

    def fake_init(*args, **kwargs):
        seen.append(kwargs.get("timeout"))
        raise RuntimeError("stop here")
    monkeypatch.setattr(fd.dist, "init_process_group", fake_init)
    monkeypatch.setattr(fd, "_timeout_min", None)
    monkeypatch.setattr(fd, "import_dynamo_first", lambda: None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("FASTGEN_TIMEOUT_MIN", raising=False)
    for call, want in ((lambda: fd.init_from_env("gloo"), 600), (lambda: fd.init_from_env("gloo", timeout_s=7), 7),
                       (lambda: fd.init_tcp(0, 2, 1, timeout_s=3), 3)):
        with pytest.raises(RuntimeError, match="stop here"):
            call()
        assert seen[-1] == datetime.timedelta(seconds=want)
    monkeypatch.setenv("FASTGEN_TIMEOUT_MIN", "0.5")
    with pytest.raises(RuntimeError, match="stop here"):
        fd.init_tcp(0, 2, 1)
    assert seen[-1] == datetime.timedelta(seconds=30)
    monkeypatch.setenv("FASTGEN_TIMEOUT_MIN", "never")
    with pytest.raises(ValueError, match=r"\$FASTGEN_TIMEOUT_MIN must be a positive number of minutes"):
        fd.init_from_env("gloo")
    monkeypatch.delenv("FASTGEN_TIMEOUT_MIN")
    quick = ["--data", "digits", "--epochs", "1", "--threads", "1", "--quiet"]
    assert main(["train", "imle", *quick, "--out", str(tmp_path / "a"), "--timeout", "2.5"]) == 2
    assert seen[-1] == datetime.timedelta(minutes=2.5)
    n = len(seen)
    assert main(["train", "vae", *quick, "--out", str(tmp_path / "b"), "--timeout", "0"]) == 2
    assert len(seen) == n                               # refused before any group is made


def _run_until_rank0_reports(worker, *args, timeout=90):
    """Spawn worker(rank, port, folder, *args) on 2 ranks; once rank 0 has saved its
    outcome (folder/rank0.pt), kill whatever still runs (a frozen rank) and return it."""
    import signal
    import time

    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as folder:
        ctx = mp.start_processes(worker, args=(free_port(), folder, *args), nprocs=2, start_method="spawn",
                                 join=False)
        path = os.path.join(folder, "rank0.pt")
        deadline = time.time() + timeout
        try:
            while not os.path.exists(path) and time.time() < deadline:
                time.sleep(0.2)
            time.sleep(0.5)    # the save is complete once the file stays
            got = torch.load(path) if os.path.exists(path) else None
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    os.kill(p.pid, signal.SIGKILL)
                p.join(10)
        if got is None:
            pytest.fail(f"rank 0 reported nothing within {timeout} s: it hung waiting for the frozen rank")
        return got


def _meet(folder, rank, timeout=120):
    """Both spawned ranks reach this point before either joins a group with a 2 s timeout:
    the timeout also bounds the join itself, and a rank still importing torch on a busy
    machine would otherwise fail the other's rendezvous."""
    import time
    open(os.path.join(folder, f"ready{rank}"), "w").close()
    deadline = time.time() + timeout
    while not os.path.exists(os.path.join(folder, f"ready{1 - rank}")):
        if time.time() > deadline:
            raise RuntimeError(f"rank {1 - rank} never started")
        time.sleep(0.01)


def _frozen_rank_worker(rank, port, folder, how):
    """Rank 1 freezes (SIGSTOP) or sleeps past the 2 s timeout; rank 0 meets it in an
    all-reduce (as fastgen.training's steps do) and records the error, as the CLI shows it."""
    import signal
    import time

    import torch.distributed as dist
    from fastgen.distributed import explain_timeout, init_tcp
    torch.set_num_threads(1)
    _meet(folder, rank)
    init_tcp(rank, 2, port, timeout_s=2)
    if rank == 1:
        time.sleep(0.5)                               # a few heartbeats first
        if how == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
        else:
            time.sleep(8)
    t0 = time.time()
    try:
        dist.all_reduce(torch.ones(3))
        msg = "no error"
    except RuntimeError as exc:
        exc = explain_timeout(exc)
        msg = f"{type(exc).__name__}: {exc}"
    torch.save((msg, time.time() - t0), os.path.join(folder, f"rank{rank}.pt"))


@pytest.mark.parametrize("how", ["stop", "sleep"])
def test_a_frozen_rank_fails_the_others_within_the_timeout_named(how):
    """SIGSTOP on one rank left torchrun silent for minutes (a 24 h timeout). Now the
    waiting rank fails after --timeout, saying which rank stopped answering (its heartbeat
    stopped) -- or that the others are alive but did not come."""
    msg, seconds = _run_until_rank0_reports(_frozen_rank_worker, how)
    assert msg.startswith("CollectiveTimeout: rank 0: no answer from the other ranks within 2 s (--timeout"), msg
    if how == "stop":
        assert "rank(s) [1] stopped answering" in msg, msg
    else:
        assert "every other rank is alive" in msg, msg
    assert seconds < 30


def _wait_worker(rank, port, folder, how):
    """wait_for_ranks: rank 1 takes longer than the timeout (alive: no error), then freezes
    or fails before the second wait."""
    import signal
    import time

    import torch.distributed as dist
    from fastgen.distributed import init_tcp, wait_for_ranks
    torch.set_num_threads(1)
    _meet(folder, rank)
    init_tcp(rank, 2, port, timeout_s=2)
    out = []
    try:
        if rank == 1:
            time.sleep(4)                            # a long share: twice the timeout, heartbeat alive
        wait_for_ranks("share")
        out.append("no error")
        if rank == 1:
            if how == "stop":
                os.kill(os.getpid(), signal.SIGSTOP)
            else:
                wait_for_ranks("share", failed=True)
                out.append("told")
        else:
            wait_for_ranks("share")
            out.append("no error")
    except RuntimeError as exc:
        out.append(f"{type(exc).__name__}: {exc}")
    torch.save(out, os.path.join(folder, f"rank{rank}.pt"))
    if how == "fail":
        dist.destroy_process_group()


@pytest.mark.parametrize("how", ["stop", "fail"])
def test_waiting_for_ranks_outlasts_the_timeout_while_they_live(how):
    """A GPNN run's final wait: the slowest rank's share may take far longer than
    --timeout (no error while it lives); a rank that froze or failed ends the wait."""
    got = _run_until_rank0_reports(_wait_worker, how)
    assert got[0] == "no error", got
    if how == "stop":
        assert got[1].startswith("CollectiveTimeout: rank 0: no answer from rank(s) [1] within 2 s"), got
    else:
        assert got[1].startswith("RuntimeError: rank(s) [1] failed before finishing their share"), got


@pytest.mark.parametrize("threads,cores,local,expected", [
    (2, 2, 2, 1), (2, 2, 1, 2), (8, 16, 2, 8), (16, 16, 4, 4), (4, 2, 3, 1), (1, 64, 1, 1)])
def test_ranks_times_threads_never_exceed_the_cores(threads, cores, local, expected):
    from fastgen.distributed import rank_threads
    assert rank_threads(threads, cores, local) == expected
    assert rank_threads(threads, cores, local) * local <= max(cores, local)


def test_a_rank_caps_its_threads_and_says_so(monkeypatch, capsys):
    from fastgen import distributed
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(2 * len(os.sched_getaffinity(0))))
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert distributed.share_cores() == 1
        assert torch.get_num_threads() == 1
        assert "rank 3 of 4: 1 thread" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)
