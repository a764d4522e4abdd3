"""`fastgen bench`: time knn against torch and faiss on this machine, print a table."""


def _csv_list(text, cast=str):
    return [cast(v.strip()) for v in text.split(",") if v.strip()]


def _shape(text):
    parts = text.lower().replace("*", "x").split("x")
    if len(parts) != 3:
        raise ValueError(f"a shape is NxMxD (e.g. 4096x1024x64), got {text!r}")
    return tuple(int(p) for p in parts)


def add_parser(sub):
    p = sub.add_parser("bench", help="benchmark knn against torch and faiss (each run in a fresh process)")
    p.add_argument("--quick", action="store_true", help="small shapes only (a smoke run: about a minute on 2 cores)")
    p.add_argument("--providers", default=None,
                   help="comma-separated; default all that run here "
                        "(fastgen-cpp, fastgen-cpp-bf16, torch-addmm, torch-cdist, faiss)")
    p.add_argument("--k", default=None, help="comma-separated k values (default 1,10)")
    p.add_argument("--shapes", default=None, help="comma-separated NxMxD shapes, overriding the preset")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per measurement, after one warm-up")
    p.add_argument("--timeout", type=float, default=None, help="seconds allowed per (provider, shape) process")
    p.add_argument("--csv", metavar="PATH", default=None, help="append the rows to this CSV")
    p.add_argument("--no-check", action="store_true", help="skip the index agreement check vs fastgen-cpp")
    p.set_defaults(func=run)


def run(args):
    import sys

    from fastgen import benchmarking as B
    if args.shapes:
        shapes = [_shape(s) for s in _csv_list(args.shapes)]
    else:
        shapes = B.QUICK_SHAPES if args.quick else B.DEFAULT_SHAPES
    k_values = _csv_list(args.k, int) if args.k else B.DEFAULT_K
    providers = _csv_list(args.providers) if args.providers else None
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    print(B.machine_line(), file=sys.stderr)

    def progress(line):
        print("  " + line, file=sys.stderr, flush=True)
    rows = B.run_knn_suite(shapes, k_values, providers, repeats=args.repeats, timeout=args.timeout,
                           check=not args.no_check, progress=progress)
    print(B.format_table(rows))
    if args.csv:
        print(f"appended {len(rows)} rows to {B.append_csv(rows, args.csv)}")
    return 0
