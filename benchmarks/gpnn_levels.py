"""Where one GPNN sample spends its time: per pyramid level and per pass (index build,
search, fold), with the work each level would be for a brute-force search.

    python benchmarks/gpnn_levels.py [IMAGE] --max-side 0 --json levels.json     (0: full size)

The default image is sklearn's china.jpg. Times come from wrapping `PatchIndex` (build,
search) and `fold_patches` as the model calls them (the model is not changed); a level
is named by its output size. "brute GFLOP" is 2 N M D per search (N query patches, M key
patches, D = C p p entries): the cost of one exhaustive sweep, the floor a pruned search
is measured against; "pairs computed" is the share of N x M (query, key) distances the
pruned search actually computed (the index's own count).
"""
import argparse
import json
import os
import platform
import sys
import time
from collections import defaultdict


def profile(image, max_side=0, seed=0, **gpnn_kwargs):
    """(rows per level, total seconds, the sample) for one GPNN sample of `image` (C, H, W)."""
    import torch

    import fastgen.models.gpnn as gm
    from fastgen.images import shrink_to

    if max_side:
        image = shrink_to(image, max_side)
    spent = defaultdict(float)
    pairs = defaultdict(lambda: [0, 0])
    searches = defaultdict(int)
    query_shapes = {}
    Base, base_fold = gm.PatchIndex, gm.fold_patches

    class TimedIndex(Base):
        def __init__(self, keys, *a, **k):
            t = time.perf_counter()
            super().__init__(keys, *a, **k)
            spent[(keys.shape[0], "build")] += time.perf_counter() - t

        def search(self, queries, hint=None):
            before = self._c.pairs() if self._c is not None else None
            t = time.perf_counter()
            out = super().search(queries, hint)
            m = self.keys.shape[0]
            spent[(m, "search")] += time.perf_counter() - t
            searches[m] += 1
            query_shapes[m] = (queries.shape[-2], queries.shape[-1])
            if before is not None:         # this search's own counts (blurred and sharp indices add up)
                total, computed = self._c.pairs()
                pairs[m][0] += total - before[0]
                pairs[m][1] += computed - before[1]
            return out

    def timed_fold(src, idx, p, **k):
        t = time.perf_counter()
        out = base_fold(src, idx, p, **k)
        hq, wq = idx.shape[-2:]
        spent[((hq) * (wq), "fold")] += time.perf_counter() - t
        return out

    gm.PatchIndex, gm.fold_patches = TimedIndex, timed_fold
    try:
        model = gm.GPNN(**gpnn_kwargs)
        t0 = time.perf_counter()
        out = model.sample(image, num_samples=1, seed=seed, progress=False)
        total = time.perf_counter() - t0
    finally:
        gm.PatchIndex, gm.fold_patches = Base, base_fold
    p = model.patch_size
    rows = []
    size = tuple(image.shape[-2:])
    shapes_per_level = model._output_shapes(size, size, len(model._scales(min(size))))   # the model's own pyramid
    for hh, ww in reversed(shapes_per_level):
        m = (hh - p + 1) * (ww - p + 1)
        n, d = query_shapes.get(m, (m, image.shape[0] * p * p))
        rows.append(dict(level=f"{hh}x{ww}", queries=n, keys=m, D=d, searches=searches.get(m, 0),
                         brute_gflop=round(2 * n * m * d * searches.get(m, 0) / 1e9, 2),
                         pairs_computed=round(pairs[m][1] / pairs[m][0], 4) if pairs[m][0] else None,
                         build_s=round(spent[(m, "build")], 3), search_s=round(spent[(m, "search")], 3),
                         fold_s=round(spent[(m, "fold")], 3)))
    return rows, total, out


def format_rows(rows, total):
    head = ["level", "queries", "keys", "D", "searches", "brute GFLOP", "pairs computed", "build s", "search s",
            "fold s", "share"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["--:"] * (len(head) - 1)) + "|"]
    for r in rows:
        s = r["build_s"] + r["search_s"] + r["fold_s"]
        pc = "-" if r["pairs_computed"] is None else f"{100 * r['pairs_computed']:.1f} %"
        lines.append(f"| {r['level']} | {r['queries']:,} | {r['keys']:,} | {r['D']} | {r['searches']} | "
                     f"{r['brute_gflop']:,} | {pc} | {r['build_s']:.2f} | {r['search_s']:.2f} | {r['fold_s']:.2f} | "
                     f"{100 * s / total:.1f} % |")
    accounted = sum(r["build_s"] + r["search_s"] + r["fold_s"] for r in rows)
    lines.append(f"\ntotal {total:.1f} s; the passes above {accounted:.1f} s; the rest (resizing, patch "
                 f"extraction, the start) {total - accounted:.1f} s")
    return "\n".join(lines)


def main(argv=None):
    import torch
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("image", nargs="?", default=None, help="an image file (default: sklearn's china.jpg)")
    p.add_argument("--max-side", type=int, default=0, help="shrink so the longer side is at most this (0: full size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from fastgen.images import load_source_image
    image = load_source_image(args.image)
    rows, total, out = profile(image, args.max_side, args.seed)
    print(f"GPNN, one sample of {args.image or 'china.jpg'}, {tuple(out.shape[-3:])}; "
          f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}")
    print(format_rows(rows, total))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(rows=rows, total_s=total, image=args.image or "china.jpg", max_side=args.max_side,
                           threads=torch.get_num_threads(), cpus=os.cpu_count()), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
