"""The main CPU paths with one thread and with the default thread count, on an idle machine
and with one core kept busy by another process -- whether more threads ever make a path
slower when fastgen does not own the machine.

    python benchmarks/threads_under_load.py                       # every path, both states
    python benchmarks/threads_under_load.py --paths knn-sweep,knn-pruned --repeats 5
    python benchmarks/threads_under_load.py --markdown out.md     # the table for RESULTS.md
    python benchmarks/threads_under_load.py --paths gpnn-full --repeats 1 --no-warmup \
        --cells idle:default,busy:1,busy:default                  # minutes per call: fewer cells

The busy core is a second Python process spinning (`while True: pass`), started before
and stopped after each busy measurement by this script (fastgen.benchmarking.busy_cores).
Each cell: median seconds of `repeats` calls after one warm-up call, in this process with
torch.set_num_threads(threads). Ratios compare cells of the same run.
"""
import argparse
import statistics
import sys
import time

import torch

from bench_knn_zoo import sample_patches as patches  # noqa: E402 (benchmarks/, next to this script)
from fastgen.benchmarking import busy_cores, machine_line


def _knn_patches():
    # china 8x8x3 -> flower 8x8x3 stride 2: 8,000 x 30,000 x 192 (the shape users reported)
    return patches("china.jpg", 8, 3, 8000, 0), patches("flower.jpg", 8, 2, 30000, 1)


def path_knn(prune):
    def setup():
        q, k = _knn_patches()
        from fastgen.ops import knn
        return lambda: knn(q, k, 1, prune=prune)
    return setup


def path_streaming():
    def setup():
        q, k = _knn_patches()
        from fastgen.ops import StreamingKNN

        def run():
            s = StreamingKNN(q, 1)
            for chunk in k.split(7500):
                s.add(chunk)
            return s.result()
        return run
    return setup


def path_gaussians():
    def setup():
        g = torch.Generator().manual_seed(2)
        q, k = torch.randn(5000, 64, generator=g), torch.randn(50000, 64, generator=g)
        from fastgen.ops import knn
        return lambda: knn(q, k, 10)
    return setup


def path_gpnn(max_side):
    def setup():
        from fastgen.images import load_source_image
        from fastgen.models.gpnn import GPNN
        src = load_source_image(None, max_side)
        model = GPNN()
        return lambda: model.sample(src, seed=0, progress=False)
    return setup


def path_patch_nn():
    def setup():
        # GPNN's search at one level: 7x7x3 patches of china.jpg at max side 200 against
        # themselves plus noise (pruned passes, C++)
        from fastgen.images import load_source_image
        from fastgen.ops import patch_nn
        img = load_source_image(None, 200)
        u = img.unfold(1, 7, 1).unfold(2, 7, 1)
        keys = u.permute(1, 2, 0, 3, 4).reshape(-1, 147).contiguous()
        queries = keys + 0.02 * torch.randn(keys.shape, generator=torch.Generator().manual_seed(4))
        return lambda: patch_nn(queries, keys, 0.005 * 147)
    return setup


def path_vq():
    def setup():
        from fastgen.nn import VectorQuantizer
        torch.manual_seed(0)
        layer = VectorQuantizer(1024, 64)
        x = torch.randn(16384, 64, requires_grad=True)

        def run():
            layer(x)[0].sum().backward()
        return run
    return setup


def path_ball_count():
    def setup():
        from fastgen.ops import ball_count, knn
        g = torch.Generator().manual_seed(3)
        real, fake = torch.randn(10000, 64, generator=g), torch.randn(10000, 64, generator=g)
        radii = knn(real, real, 5, exclude_self=True).dist[:, -1]
        return lambda: ball_count(fake, real, radii)
    return setup


PATHS = {
    "knn-sweep": path_knn(False),
    "knn-pruned": path_knn(True),
    "knn-auto": path_knn(None),
    "streaming-knn": path_streaming(),
    "knn-gaussians": path_gaussians(),
    "patch-nn": path_patch_nn(),
    "gpnn-128": path_gpnn(128),
    "gpnn-full": path_gpnn(None),
    "vq-layer": path_vq(),
    "ball-count": path_ball_count(),
}


def timed(fn, repeats, warmup=True):
    if warmup:
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, of: {', '.join(PATHS)}")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", default=None, help="the many-thread count (default: torch's default here)")
    ap.add_argument("--markdown", default=None, help="also write the table to this file")
    ap.add_argument("--no-warmup", action="store_true", help="skip the warm-up call (paths of minutes)")
    ap.add_argument("--cells", default="idle:1,idle:default,busy:1,busy:default",
                    help="which of state:threads to measure (state idle or busy; threads 1 or default)")
    args = ap.parse_args(argv)
    default = int(args.threads) if args.threads else torch.get_num_threads()
    cells_wanted = []
    for cell in args.cells.split(","):
        state, _, threads = cell.strip().partition(":")
        if state not in ("idle", "busy") or threads not in ("1", "default"):
            ap.error(f"--cells: {cell!r} is not state:threads with state idle/busy and threads 1/default")
        cells_wanted.append((int(state == "busy"), 1 if threads == "1" else default))
    names = [p.strip() for p in args.paths.split(",") if p.strip()]
    for n in names:
        if n not in PATHS:
            ap.error(f"--paths: unknown path {n!r}")
    rows = []
    for name in names:
        fn = PATHS[name]()
        cells = {}
        for busy, threads in cells_wanted:
            torch.set_num_threads(threads)
            with busy_cores(busy):
                cells[busy, threads] = timed(fn, args.repeats, not args.no_warmup)
            print(f"{name}: busy={busy} threads={threads}: {cells[busy, threads]:.3f} s", file=sys.stderr, flush=True)
        torch.set_num_threads(default)
        rows.append((name, cells))
    head = (f"| path | idle, 1 thread | idle, {default} threads | ratio | one core busy, 1 thread | "
            f"one core busy, {default} threads | ratio |")
    lines = [machine_line(), "", head, "|---|--:|--:|--:|--:|--:|--:|"]
    def cell(c, key):
        return f"{c[key]:.3f}" if key in c else "--"

    def ratio(c, busy):
        return f"{c[busy, default] / c[busy, 1]:.2f}" if (busy, default) in c and (busy, 1) in c else "--"

    for name, c in rows:
        lines.append(f"| {name} | {cell(c, (0, 1))} | {cell(c, (0, default))} | {ratio(c, 0)} | "
                     f"{cell(c, (1, 1))} | {cell(c, (1, default))} | {ratio(c, 1)} |")
    text = "\n".join(lines) + "\n\nratio: seconds with the default thread count / with one thread (< 1: threads help)\n"
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
