"""How many threads fastgen's fine-grained CPU work uses when it does not own the machine.

The pruned searches (GPNN's iterations at its small pyramid levels: loops of many short
parallel regions, small kernels and torch ops of a few milliseconds or less; knn's pruned
pass: one region of many small GEMMs, kept under the same policy because it measured no
worse there, benchmarks/RESULTS.md "knn's automatic choice"). When
another process keeps a core busy, the OS gives each region's second thread only part of
that core; a region ends when its last thread does, so every region waits for a thread
that was preempted mid-work -- about a scheduler time slice each, thousands of times per
call. One thread then beats two (measured in benchmarks/RESULTS.md, "Threads on a busy
machine"). Large single regions (the full sweep, patch_nn's C++ passes on a large level)
balance their rows dynamically and keep the default thread count.

`fine_grained_threads()` is the policy: as many threads as cores no other process is
running on (at least one; on a 2-core machine with one busy core, one thread), at most
the caller's count; decided when the block is entered, from /proc/stat's count of
running tasks less this process's own, against the cores this process may use (its CPU
affinity). FASTGEN_FINE_THREADS=N fixes the count instead (0: the caller's).
"""
import contextlib
import os

import torch

ENV = "FASTGEN_FINE_THREADS"


def _own_running_threads():
    """This process's threads in state R (running or runnable), the caller included."""
    n = 0
    try:
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/stat") as f:
                    # the state follows the command name, which is in parentheses
                    if f.read().rpartition(")")[2].split()[0] == "R":
                        n += 1
            except OSError:
                continue
    except OSError:
        return 1
    return max(n, 1)


def other_running_tasks():
    """Tasks of other processes running or waiting for a core now (Linux /proc/stat), or
    None where that cannot be read."""
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("procs_running"):
                    return max(0, int(line.split()[1]) - _own_running_threads())
    except (OSError, ValueError, IndexError):
        return None
    return None


def fine_grained_thread_count():
    """The thread count fine_grained_threads() would use now."""
    threads = torch.get_num_threads()
    env = os.environ.get(ENV, "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"${ENV} must be an integer thread count (0: torch's), got {env!r}") from None
        if n < 0:
            raise ValueError(f"${ENV} must be >= 0, got {n}")
        return n or threads
    if threads <= 1:
        return threads
    others = other_running_tasks()
    if others is None:
        return threads
    # the cores other processes are not using, at least one
    return max(1, min(threads, usable_cores() - others))


def usable_cores():
    """The cores this process may run on (its affinity: a container's or taskset's limit)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@contextlib.contextmanager
def fine_grained_threads():
    """torch's (and the engine's) thread count for a block of many short parallel regions:
    see the module docstring. Restores the caller's count after the block."""
    before = torch.get_num_threads()
    n = fine_grained_thread_count()
    if n != before:
        torch.set_num_threads(n)
    try:
        yield n
    finally:
        if n != before:
            torch.set_num_threads(before)
