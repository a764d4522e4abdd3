"""fastgen.threads: the fine-grained paths drop to one thread while another process holds
a core, restore the caller's count after, and can be fixed by the environment."""
import pytest
import torch

from fastgen import threads
from fastgen.benchmarking import busy_cores
from fastgen.threads import ENV, fine_grained_thread_count, fine_grained_threads, other_running_tasks


@pytest.fixture
def two_threads_on_two_cores(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_one_thread_while_another_process_spins(two_threads_on_two_cores):
    with busy_cores(1):
        assert other_running_tasks() >= 1
        assert fine_grained_thread_count() == 1
        with fine_grained_threads() as n:
            assert n == 1 and torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2          # the caller's count is back


def test_the_count_is_restored_after_an_error(two_threads_on_two_cores):
    with busy_cores(1):
        with pytest.raises(KeyError):
            with fine_grained_threads():
                raise KeyError("x")
    assert torch.get_num_threads() == 2


def test_the_environment_fixes_the_count(two_threads_on_two_cores, monkeypatch):
    monkeypatch.setenv(ENV, "2")
    with busy_cores(1):
        assert fine_grained_thread_count() == 2
    monkeypatch.setenv(ENV, "0")
    assert fine_grained_thread_count() == torch.get_num_threads()
    for bad in ("two", "-1"):
        monkeypatch.setenv(ENV, bad)
        with pytest.raises(ValueError, match=ENV):
            fine_grained_thread_count()


def test_pruned_search_on_a_busy_machine_is_still_exact(two_threads_on_two_cores):
    from fastgen.ops import knn
    g = torch.Generator().manual_seed(5)
    c = torch.randn(10, 9, generator=g) * 3
    pts = c[torch.randint(10, (1200,), generator=g)] + 0.05 * torch.randn(1200, 9, generator=g)
    q, k = pts[:400], pts[400:]
    sweep = knn(q, k, 3, prune=False)
    with busy_cores(1):
        got = knn(q, k, 3, prune=True)
    assert torch.equal(got.idx, sweep.idx) and torch.equal(got.dist, sweep.dist)
    assert torch.get_num_threads() == 2
