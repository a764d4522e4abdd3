"""knn's prune-or-sweep choice judged on a zoo of data it was not written for.

    python benchmarks/bench_knn_zoo.py                     # every case, both halves
    python benchmarks/bench_knn_zoo.py --half tune         # the half the policy was tuned on
    python benchmarks/bench_knn_zoo.py --json zoo.json     # keep the rows

Cases: patches of sklearn's two photos (china.jpg, flower.jpg) at patch sizes 5-9 and
strides 1-4, 6,000 x 30,000, and of scikit-image's astronaut, coffee, chelsea, rocket and
camera at 5x5 and 8x8, 15,000 x 40,000, queries and keys from different images and from
the same one; Gaussians;
Gaussian mixtures; sklearn digits; IMLE-like (digits as data, a noisy generator's
samples as keys); k = 1, 5, 10. Each case is in the "tune" or the "held-out" half (fixed,
by its position), so a policy tuned on one half is reported on the other.

For every case, in one process: the sweep (`prune=False`), the pruned path
(`prune=True`) and the automatic choice (`prune=None`: its sample included), each the
median of `--repeats` interleaved rounds after a warm-up, and at k = 1 faiss's
IndexFlatL2 when installed; every answer's indices are checked against the sweep's (the
pruned path is exact, bit for bit). The table gives auto / min(sweep, pruned) (the
policy's target is <= 1.10 on every case) and, apart from noise, the choice alone: the
median of the path auto took over the faster one's.
"""
import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch


SKIMAGE = ("astronaut", "coffee", "chelsea", "camera", "rocket")


def _image(name):
    """(3, H, W) in [0, 1]: sklearn's china.jpg / flower.jpg, or one of scikit-image's
    bundled photos (grey ones repeated over three channels)."""
    if name.endswith(".jpg"):
        from sklearn.datasets import load_sample_image
        x = np.array(load_sample_image(name))
    else:
        import skimage.data
        x = np.array(getattr(skimage.data, name)())
        if x.dtype == bool:
            x = x.astype(np.uint8) * 255
        if x.ndim == 2:
            x = np.repeat(x[:, :, None], 3, axis=2)
    return torch.from_numpy(x[:, :, :3].copy()).float().div(255).permute(2, 0, 1)


def sample_patches(name, p, stride, limit, seed):
    """`limit` random p x p x 3 patches (stride `stride`) of one of sklearn's photos, (n, 3 p p)."""
    u = _image(name).unfold(1, p, stride).unfold(2, p, stride)
    x = u.permute(1, 2, 0, 3, 4).reshape(-1, 3 * p * p)
    g = torch.Generator().manual_seed(seed)
    return x[torch.randperm(x.shape[0], generator=g)[:limit]].contiguous()


def _digits():
    from sklearn.datasets import load_digits
    return torch.from_numpy(load_digits().data).float().div(16)


def make_case(c):
    """(queries, keys) of one case description."""
    kind = c["kind"]
    g = torch.Generator().manual_seed(c.get("seed", 0))
    if kind == "patches":
        q = sample_patches(c["q_img"], c["p"], c["q_stride"], c["n"], 1)
        k = sample_patches(c["k_img"], c["p"], c["k_stride"], c["m"], 2)
        return q, k
    if kind == "uniform":
        return torch.rand(c["n"], c["d"], generator=g), torch.rand(c["m"], c["d"], generator=g)
    if kind == "gaussian":
        return torch.randn(c["n"], c["d"], generator=g), torch.randn(c["m"], c["d"], generator=g)
    if kind == "mixture":
        centres = torch.randn(c["clusters"], c["d"], generator=g) * 4
        pick = lambda n: centres[torch.randint(c["clusters"], (n,), generator=g)]  # noqa: E731
        return (pick(c["n"]) + torch.randn(c["n"], c["d"], generator=g),
                pick(c["m"]) + torch.randn(c["m"], c["d"], generator=g))
    if kind == "digits":
        x = _digits()
        reps = -(-c["m"] // x.shape[0])
        keys = (x.repeat(reps, 1)[:c["m"]] + 0.05 * torch.randn(c["m"], 64, generator=g)).contiguous()
        return x[:c["n"]].contiguous(), keys
    if kind == "imle":
        # data points vs the samples of a barely trained generator: near-identical keys
        x = _digits()[:c["n"]].contiguous()
        mean = x.mean(0, keepdim=True)
        keys = mean + c["spread"] * torch.randn(c["m"], x.shape[1], generator=g)
        return x, keys.contiguous()
    raise ValueError(kind)


def zoo():
    cases = []
    for (qi, ki) in (("china.jpg", "flower.jpg"), ("flower.jpg", "china.jpg"), ("china.jpg", "china.jpg"),
                     ("flower.jpg", "flower.jpg")):
        for p, qs, ks in ((5, 3, 2), (7, 3, 2), (9, 4, 3), (6, 2, 1)):
            for k in (1, 5):
                cases.append({"kind": "patches", "q_img": qi, "k_img": ki, "p": p, "q_stride": qs,
                              "k_stride": ks, "n": 6000, "m": 30000, "k": k})
    # scikit-image's photos, more queries (the pruned path's index is built once per call:
    # it pays only when the queries are many against the keys)
    for (qi, ki) in (("astronaut", "coffee"), ("coffee", "coffee"), ("chelsea", "rocket"), ("rocket", "astronaut"),
                     ("camera", "camera")):
        for p, qs, ks in ((5, 2, 1), (8, 2, 2)):
            for k in (1, 10):
                cases.append({"kind": "patches", "q_img": qi, "k_img": ki, "p": p, "q_stride": qs,
                              "k_stride": ks, "n": 15000, "m": 40000, "k": k})
    for d in (8, 32, 128):
        for k in (1, 10):
            cases.append({"kind": "gaussian", "d": d, "n": 5000, "m": 40000, "k": k})
            cases.append({"kind": "mixture", "d": d, "clusters": 50, "n": 5000, "m": 40000, "k": k})
    for k in (1, 5, 10):
        cases.append({"kind": "digits", "n": 1797, "m": 40000, "k": k})
        cases.append({"kind": "imle", "spread": 0.05, "n": 1797, "m": 40000, "k": k})
    for i, c in enumerate(cases):
        c["half"] = "tune" if i % 2 == 0 else "held-out"
        c["id"] = _case_id(c, ("q_img", "k_img", "p", "q_stride", "k_stride", "d", "clusters", "spread", "n", "m", "k"))
    return cases


def _case_id(c, keys):
    return f"{c['kind']}-" + "-".join(f"{key}{c[key]}" for key in keys if key in c)


def fresh():
    """Cases the policy never saw while it was tuned (neither half): other images (textures,
    documents, a binary silhouette full of exact duplicates, smooth gradients, a
    microscope slide against a telescope image), N/M from 0.125 to 1, uniform data in 4
    dimensions, noise and clusters at N = M."""
    cases = []
    for qi, ki, p, st, n, m, k in (("immunohistochemistry", "hubble_deep_field", 7, 2, 10000, 40000, 1),
                                   ("brick", "brick", 6, 2, 20000, 40000, 5),
                                   ("grass", "gravel", 5, 2, 6000, 40000, 1),
                                   ("horse", "horse", 8, 1, 10000, 40000, 1),
                                   ("page", "text", 7, 1, 8000, 30000, 3),
                                   ("colorwheel", "colorwheel", 5, 1, 10000, 40000, 1),
                                   ("moon", "coins", 9, 2, 5000, 40000, 1)):
        cases.append({"kind": "patches", "q_img": qi, "k_img": ki, "p": p, "q_stride": st, "k_stride": st,
                      "n": n, "m": m, "k": k})
    cases += [{"kind": "uniform", "d": 4, "n": 20000, "m": 40000, "k": 1},
              {"kind": "gaussian", "d": 16, "n": 40000, "m": 40000, "k": 5},
              {"kind": "mixture", "d": 64, "clusters": 200, "n": 40000, "m": 40000, "k": 1}]
    for c in cases:
        c["half"] = "fresh"
        c["id"] = _case_id(c, ("q_img", "k_img", "p", "q_stride", "d", "clusters", "n", "m", "k"))
    return cases


def _interleaved_medians(fns, repeats):
    """{name: (median seconds, last output)}: one warm-up call each, then `repeats` rounds
    calling every fn once per round, so a change in the machine's load falls on all of
    them alike (timed one after the other, a busy spell lands on one path only)."""
    out = {name: fn() for name, fn in fns.items()}
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            out[name] = fn()
            times[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(times[name]), out[name]) for name in fns}


def run_case(c, repeats, with_faiss):
    from fastgen.ops import knn
    from fastgen.ops.knn_plan import plan_knn, relative_structure, structure_ratio
    q, keys = make_case(c)
    k = c["k"]
    row = {"id": c["id"], "half": c["half"], "n": q.shape[0], "m": keys.shape[0], "d": q.shape[1], "k": k,
           "ratio": structure_ratio(q, keys, k), "relative": relative_structure(q, keys, k),
           "auto_prunes": plan_knn(q, keys, k).prune}
    fns = {"sweep": lambda: knn(q, keys, k, prune=False), "pruned": lambda: knn(q, keys, k, prune=True),
           "auto": lambda: knn(q, keys, k)}
    got = _interleaved_medians(fns, repeats)
    ref = got["sweep"][1]
    for name in ("pruned", "auto"):
        if not torch.equal(got[name][1].idx, ref.idx):
            raise AssertionError(f"{c['id']}: {name} differs from the sweep in "
                                 f"{int((got[name][1].idx != ref.idx).any(1).sum())} rows")
    for name in fns:
        row[f"{name}_s"] = got[name][0]
    row["faiss_s"] = None
    if with_faiss and k == 1:
        # (faiss is the slow one: two calls after a warm-up, and only where the table needs it)
        from fastgen.benchmarking import faiss_flat
        row["faiss_s"] = _interleaved_medians({"faiss": lambda: faiss_flat(q, keys, k)}, 2)["faiss"][0]
    best = min(row["sweep_s"], row["pruned_s"])
    row["auto_vs_best"] = row["auto_s"] / best
    row["pruned_vs_sweep"] = row["pruned_s"] / row["sweep_s"]
    # the choice against the faster of the two, and what a wrong one costs (noise apart)
    chosen = row["pruned_s"] if row["auto_prunes"] else row["sweep_s"]
    row["choice_vs_best"] = chosen / best
    return row


def family(case_id):
    kind = case_id.split("-")[0]
    if kind != "patches":
        return kind
    q, k = case_id.split("-q_img")[1].split("-k_img")[0], case_id.split("-k_img")[1].split("-p")[0]
    where = "(sklearn)" if q.endswith(".jpg") else "(scikit-image)"
    return f"patches {where}, {'same image' if q == k else 'across images'}"


def family_table(rows):
    """One line per family and half: what RESULTS.md shows."""
    lines = ["| family | half | cases | N/M | relative structure | auto prunes | sweep s (median) | pruned / sweep "
             "| choice / best (worst) | auto / best (worst) | faiss / pruned at k=1 |",
             "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    groups = {}
    for r in rows:
        groups.setdefault((family(r["id"]), r["half"]), []).append(r)
    for (fam, half), rs in sorted(groups.items()):
        rng = lambda v: f"{min(v):.2f}-{max(v):.2f}"   # noqa: E731
        fa = [r["faiss_s"] / r["pruned_s"] for r in rs if r["faiss_s"]]
        lines.append(f"| {fam} | {half} | {len(rs)} | {rng([r['n'] / r['m'] for r in rs])} "
                     f"| {rng([r['relative'] for r in rs])} "
                     f"| {sum(r['auto_prunes'] for r in rs)} | {statistics.median(r['sweep_s'] for r in rs):.3f} "
                     f"| {rng([r['pruned_vs_sweep'] for r in rs])} | {max(r['choice_vs_best'] for r in rs):.2f} "
                     f"| {max(r['auto_vs_best'] for r in rs):.2f} | {rng(fa) if fa else '-'} |")
    return "\n".join(lines)


def table(rows):
    lines = ["| case | half | ratio | sweep s | pruned s | auto s | faiss s | pruned / sweep | auto / best |",
             "|---|---|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        f = "-" if r["faiss_s"] is None else f"{r['faiss_s']:.3f}"
        lines.append(f"| {r['id']} | {r['half']} | {r['ratio']:.2f} | {r['sweep_s']:.3f} | {r['pruned_s']:.3f} | "
                     f"{r['auto_s']:.3f} | {f} | {r['pruned_vs_sweep']:.2f} | {r['auto_vs_best']:.2f} |")
    for half in ("tune", "held-out", "fresh"):
        sel = [r for r in rows if r["half"] == half]
        if sel:
            a, ch = [r["auto_vs_best"] for r in sel], [r["choice_vs_best"] for r in sel]
            lines.append(f"\n{half}: auto / best worst {max(a):.2f}, median {statistics.median(a):.2f}, "
                         f"{sum(v <= 1.10 for v in a)} of {len(a)} cases within 10 %; the choice (its path's "
                         f"median) worst {max(ch):.2f}, {sum(v <= 1.10 for v in ch)} of {len(ch)} within 10 %")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--half", choices=("tune", "held-out", "both", "fresh"), default="both",
                    help="fresh: the cases neither half holds (fresh())")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-faiss", action="store_true")
    ap.add_argument("--only", default=None, help="a substring of the case ids to run")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    with_faiss = not args.no_faiss
    if with_faiss:
        try:
            import faiss  # noqa: F401
        except ImportError:
            with_faiss = False
    rows = []
    for c in (fresh() if args.half == "fresh" else zoo()):
        if args.half not in ("both", "fresh") and c["half"] != args.half:
            continue
        if args.only and args.only not in c["id"]:
            continue
        r = run_case(c, args.repeats, with_faiss)
        rows.append(r)
        print(f"{r['id']}: ratio {r['ratio']:.2f} sweep {r['sweep_s']:.3f} pruned {r['pruned_s']:.3f} "
              f"auto {r['auto_s']:.3f} (auto/best {r['auto_vs_best']:.2f})", file=sys.stderr, flush=True)
    from fastgen.benchmarking import machine_line
    print(machine_line() + "\n\n" + table(rows) + "\n\n" + family_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
