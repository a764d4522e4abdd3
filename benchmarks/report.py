"""Render benchmark results (pytest-benchmark JSON written through fastgen's harness) into
RESULTS.md -- one section per op, between `<!-- op:begin -->` and `<!-- op:end -->`, so
sections of ops not in this run survive -- and one plot per op.

    pytest benchmarks/ --benchmark-only --benchmark-json=out.json -k quick
    python benchmarks/report.py out.json                       # -> benchmarks/RESULTS.md, <op>.png
    python benchmarks/report.py out.json --print               # only print the tables
"""
import argparse
import os
import sys

from fastgen.benchmarking import format_table, markdown_section, rows_from_json


def write_section(path, op, section):
    """Replace op's section of `path` (or append it; create the file if needed)."""
    begin, end = f"<!-- {op}:begin -->", f"<!-- {op}:end -->"
    text = open(path).read() if os.path.exists(path) else "# fastgen benchmark results\n"
    if begin in text and end in text and text.index(begin) < text.index(end):
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    with open(path, "w") as f:
        f.write(text)


def plot(op, rows, path):
    """Grouped bars: median time per provider, one group per (case, mode); log scale,
    p20-p80 whiskers."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = list(dict.fromkeys((r["case"], r["mode"]) for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    by = {(r["case"], r["mode"], r["provider"]): r for r in rows}
    width = 0.8 / max(1, len(providers))
    fig, ax = plt.subplots(figsize=(max(7.0, 1.6 * len(groups) + 3.5), 4.5))
    for j, p in enumerate(providers):
        xs, ys, lo, hi = [], [], [], []
        for i, g in enumerate(groups):
            r = by.get(g + (p,))
            if r is None:
                continue
            xs.append(i + (j - (len(providers) - 1) / 2) * width)
            ys.append(r["median_s"] * 1e3)
            lo.append(max(0.0, (r["median_s"] - r["p20_s"]) * 1e3))
            hi.append(max(0.0, (r["p80_s"] - r["median_s"]) * 1e3))
        ax.bar(xs, ys, width, label=p, yerr=[lo, hi], capsize=2)
    ax.set_yscale("log")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{c.split('-', 1)[1]}\n{m}" for c, m in groups], fontsize=7)
    ax.set_ylabel("median time (ms, log scale)")
    ax.set_title(f"{op} on {rows[0]['cpu']}, {rows[0]['threads']} threads ({rows[0]['date'][:10]})", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="+", help="pytest-benchmark JSON files (--benchmark-json)")
    ap.add_argument("--out-dir", default=os.path.dirname(os.path.abspath(__file__)),
                    help="where RESULTS.md and the plots go (default: benchmarks/)")
    ap.add_argument("--print", action="store_true", help="print the tables only, write nothing")
    args = ap.parse_args(argv)
    rows = rows_from_json(*args.json)
    if not rows:
        raise SystemExit(f"no fastgen benchmark results in {', '.join(args.json)} (run with --benchmark-json)")
    print(format_table(rows))
    if args.print:
        return 0
    md = os.path.join(args.out_dir, "RESULTS.md")
    for op in dict.fromkeys(r["op"] for r in rows):
        op_rows = [r for r in rows if r["op"] == op]
        png = f"{op}.png"
        try:
            plot(op, op_rows, os.path.join(args.out_dir, png))
        except ImportError:
            png = None
            print("matplotlib is not installed: no plot", file=sys.stderr)
        write_section(md, op, markdown_section(op, op_rows, png, [os.path.relpath(j) for j in args.json]))
        print(f"wrote the {op} section of {md}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
