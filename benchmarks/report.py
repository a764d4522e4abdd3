"""Run the knn benchmark suite and write its section of RESULTS.md and a plot.

    python benchmarks/report.py --quick --repeats 2     # small shapes, a smoke run
    python benchmarks/report.py                         # the issue's shapes, k in {1, 10}

Writes <out-dir>/RESULTS.md (only the part between `<!-- knn:begin -->` and
`<!-- knn:end -->`, so other ops' sections survive) and <out-dir>/knn.png; with
--csv also appends the rows to <out-dir>/results.csv. Each (provider, shape) is
measured in a fresh process by fastgen.benchmarking (see there for how peak
memory is measured).
"""
import argparse
import math
import os
import shlex
import sys

from fastgen import benchmarking as B

BEGIN, END = "<!-- knn:begin -->", "<!-- knn:end -->"


def _num(v, spec):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def markdown_section(rows, command, info):
    lines = [BEGIN, "## knn", "",
             f"Command: `{command}`  ", f"Machine: {info['cpu']}, {info['cores']} cores, torch threads "
             f"{info['threads']}, torch {info['torch']}, fastgen {info['fastgen']}, "
             f"load average {info['loadavg']} at start  ",
             f"Date: {info['date']}  ", f"Repeats: {rows[0]['repeats'] if rows else '-'} timed calls after one "
             "warm-up, each (provider, shape) in a fresh process; peak MB = peak RSS above the inputs.", "",
             "Time ratios are this row's median divided by faiss's / torch-addmm's median for the same "
             "shape and k in this run (below 1 = faster). All providers get the same float32 inputs "
             "(standard normal, seeded); faiss is `IndexFlatL2` with the index built inside the timed call.",
             "",
             "| N x M x D | k | provider | median ms | p20 ms | p80 ms | GFLOP/s | peak MB | vs faiss "
             "| vs torch-addmm | check |",
             "|---|--:|---|--:|--:|--:|--:|--:|--:|--:|---|"]
    for r in rows:
        check = r.get("check", "") + (f" ({r['note']})" if r.get("note") else "")
        lines.append(f"| {r['N']} x {r['M']} x {r['D']} | {r['k']} | {r['provider']} "
                     f"| {_num(r['median_s'] * 1e3, '.2f')} | {_num(r['p20_s'] * 1e3, '.2f')} "
                     f"| {_num(r['p80_s'] * 1e3, '.2f')} | {_num(r['gflops'], '.1f')} "
                     f"| {_num(r['peak_mb'], '.1f')} | {_num(r.get('ratio_vs_faiss'), '.2f')} "
                     f"| {_num(r.get('ratio_vs_torch_addmm'), '.2f')} | {check} |")
    lines += ["", "![knn time per provider](knn.png)", END]
    return "\n".join(lines)


def write_section(path, section):
    """Replace the knn section of `path` (or append it; create the file if needed)."""
    text = open(path).read() if os.path.exists(path) else "# fastgen benchmark results\n"
    if BEGIN in text and END in text and text.index(BEGIN) < text.index(END):
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    with open(path, "w") as f:
        f.write(text)


def plot(rows, path):
    """Grouped bars: median time per provider, one group per (shape, k); log scale, p20-p80 whiskers."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r["N"], r["M"], r["D"], r["k"]) for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    by = {(r["N"], r["M"], r["D"], r["k"], r["provider"]): r for r in rows}
    width = 0.8 / max(1, len(providers))
    fig, ax = plt.subplots(figsize=(max(7.0, 1.6 * len(groups) + 3.5), 4.5))
    for j, p in enumerate(providers):
        xs, ys, lo, hi = [], [], [], []
        for i, g in enumerate(groups):
            r = by.get(g + (p,))
            if r is None or not r["median_s"] == r["median_s"]:
                continue
            xs.append(i + (j - (len(providers) - 1) / 2) * width)
            ys.append(r["median_s"] * 1e3)
            lo.append(max(0.0, (r["median_s"] - r["p20_s"]) * 1e3))
            hi.append(max(0.0, (r["p80_s"] - r["median_s"]) * 1e3))
        ax.bar(xs, ys, width, label=p, yerr=[lo, hi], capsize=2)
    ax.set_yscale("log")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{n}x{m}x{d}\nk={k}" for n, m, d, k in groups], fontsize=8)
    ax.set_ylabel("median time (ms, log scale)")
    info = rows[0]
    ax.set_title(f"knn on {info['cpu']}, {info['threads']} threads ({info['date'][:10]})", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes only")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per measurement, after one warm-up")
    ap.add_argument("--out-dir", default="benchmarks", help="where RESULTS.md, knn.png (and results.csv) go")
    ap.add_argument("--providers", default=None, help="comma-separated provider names (default: all available)")
    ap.add_argument("--k", default=None, help="comma-separated k values (default 1,10)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds allowed per (provider, shape)")
    ap.add_argument("--csv", action="store_true", help="also append the rows to <out-dir>/results.csv")
    args = ap.parse_args(argv)

    shapes = B.QUICK_SHAPES if args.quick else B.DEFAULT_SHAPES
    k_values = [int(v) for v in args.k.split(",")] if args.k else B.DEFAULT_K
    providers = [p.strip() for p in args.providers.split(",")] if args.providers else None
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__)] + sys.argv[1:]) \
        if argv is None else "python benchmarks/report.py " + " ".join(shlex.quote(a) for a in argv)
    info = B.machine_info()
    print(B.machine_line(info), file=sys.stderr)
    rows = B.run_knn_suite(shapes, k_values, providers, repeats=args.repeats, timeout=args.timeout,
                           progress=lambda line: print("  " + line, file=sys.stderr, flush=True))
    os.makedirs(args.out_dir, exist_ok=True)
    md = os.path.join(args.out_dir, "RESULTS.md")
    write_section(md, markdown_section(rows, command, info))
    png = os.path.join(args.out_dir, "knn.png")
    plot(rows, png)
    print(B.format_table(rows, info))
    print(f"wrote {md} and {png}")
    if args.csv:
        print(f"appended {len(rows)} rows to {B.append_csv(rows, os.path.join(args.out_dir, 'results.csv'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
