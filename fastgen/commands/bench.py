"""`fastgen bench`: run the benchmark suites (benchmarks/bench_<op>.py) through the harness
and print their tables.

    fastgen bench --quick                       # knn, small cases (about a minute on 2 cores)
    fastgen bench --ops knn,patch_nn --json out.json
    python benchmarks/report.py out.json        # then RESULTS.md sections and plots

The same pytest-benchmark run as `pytest benchmarks/bench_<op>.py --benchmark-only`
(fastgen/benchmarking.py); it needs a source checkout, where benchmarks/ lives.
"""
import os


def add_parser(sub):
    p = sub.add_parser("bench", help="benchmark the ops against their reference and peers (pytest-benchmark)",
                       description=__doc__.splitlines()[0])
    p.add_argument("--ops", default="knn", help="comma-separated ops, i.e. benchmarks/bench_<op>.py (default knn)")
    p.add_argument("--quick", action="store_true", help="small cases only")
    p.add_argument("--providers", default=None, help="comma-separated providers (default: all available)")
    p.add_argument("-k", dest="select", default=None, help="a pytest -k expression to select cases further")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per measurement (default: the suite's)")
    p.add_argument("--json", default=None, help="keep the pytest-benchmark JSON here (for report.py / compare)")
    p.add_argument("--no-peak-memory", action="store_true", help="skip the fresh-process peak-memory runs")
    p.add_argument("--busy-cores", type=int, default=0,
                   help="keep this many cores busy with spinning processes while the suites run (default 0)")
    p.set_defaults(func=run)


def benchmarks_dir():
    """benchmarks/ of the source checkout this fastgen runs from, or a clear error."""
    import fastgen
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(fastgen.__file__))), "benchmarks")
    if not os.path.isdir(here):
        raise FileNotFoundError(f"fastgen bench runs the suites in a source checkout's benchmarks/ folder; "
                                f"{here} does not exist (clone the repository and install it with pip -e)")
    return here


def run(args):
    import subprocess
    import sys
    import tempfile

    from fastgen.benchmarking import format_table, rows_from_json
    if args.repeats is not None and args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    folder = benchmarks_dir()
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    if not ops:
        raise ValueError(f"--ops names no op, got {args.ops!r}")
    files = []
    for op in ops:
        path = os.path.join(folder, f"bench_{op}.py")
        if not os.path.isfile(path):
            known = sorted(f[6:-3] for f in os.listdir(folder) if f.startswith("bench_") and f.endswith(".py"))
            raise ValueError(f"--ops: no suite for {op!r} (known: {', '.join(known)})")
        files.append(path)
    out = args.json or os.path.join(tempfile.mkdtemp(prefix="fastgen-bench-"), "bench.json")
    # -rs: every skipped provider is listed with its reason (e.g. "faiss is not installed"),
    # so a '-' in the table is explained
    cmd = [sys.executable, "-m", "pytest", *files, "--benchmark-only", f"--benchmark-json={out}", "-q", "-rs",
           "-p", "no:cacheprovider", "--rootdir", folder]
    select = [s for s in ("quick" if args.quick else None, args.select) if s]
    if select:
        cmd += ["-k", " and ".join(f"({s})" for s in select)]
    if args.providers:
        cmd.append(f"--benchmark-providers={args.providers}")
    if args.no_peak_memory:
        cmd.append("--benchmark-no-peak-memory")
    if args.busy_cores < 0:
        raise ValueError(f"--busy-cores must be >= 0, got {args.busy_cores}")
    if args.busy_cores:
        cmd.append(f"--benchmark-busy-cores={args.busy_cores}")
    if args.repeats:
        cmd.append(f"--benchmark-rounds={args.repeats}")
    print("running: " + " ".join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd)
    if not os.path.exists(out) or os.path.getsize(out) == 0:
        raise ValueError("no benchmark ran (every case was deselected or skipped: check --providers and -k "
                         f"against the suite; pytest exit status {proc.returncode})")
    rows = rows_from_json(out)
    if not rows:
        raise ValueError("no benchmark ran (every case was deselected or skipped: check --providers and -k)")
    print(format_table(rows))
    if args.json:
        print(f"results: {out} (python benchmarks/report.py {out} writes RESULTS.md)")
    if proc.returncode not in (0, 5):
        raise RuntimeError(f"some benchmarks failed (pytest exit status {proc.returncode}); see above")
    return 0
