"""Benchmark harness for fastgen's ops against the libraries a user would pick instead.

Used by `fastgen bench`, `benchmarks/bench_knn.py` (pytest-benchmark) and
`benchmarks/report.py` (RESULTS.md table + plot). For the knn op:

- providers, keyed by name, all run on the same seeded float32 inputs
  (`make_inputs`): `fastgen-cpp`, `fastgen-cpp-bf16`, `torch-addmm`,
  `torch-cdist`, `faiss` (only when faiss imports);
- `time_fn`: median / p20 / p80 wall time over repeats, after a warm-up call;
- `measure_in_subprocess`: one provider on one shape (each k) in a fresh Python
  process, timed and with its peak extra memory (the method is described above
  `_proc_status_kb`);
- `check_against_cpp`: before timing, each provider's indices vs fastgen-cpp on
  the first queries that are not near-tied (warns, never fails);
- `run_knn_suite`: all of the above -> one row dict per (shape, k, provider),
  with time ratios vs faiss and vs torch-addmm measured in the same run;
- `append_csv`, `format_table`.
"""
import csv
import datetime
import json
import os
import re
import subprocess
import sys
import time
import warnings

import torch

OP = "knn"

# (N queries, M keys, D dims), from the issue: VQ-sized, IMLE-sized, metrics-sized,
# and one GPNN level (122x122 image -> 14884 patches of 7x7x3 = 147 values).
DEFAULT_SHAPES = [(16384, 1024, 64), (65536, 8192, 256), (10000, 100000, 512), (14884, 14884, 147)]
QUICK_SHAPES = [(4096, 1024, 64), (4096, 4096, 147)]
DEFAULT_K = [1, 10]
BASELINES = ("faiss", "torch-addmm")  # ratios are reported against these
CHECK_QUERIES = 256

CSV_FIELDS = ["op", "N", "M", "D", "k", "provider", "median_s", "p20_s", "p80_s", "peak_mb", "gflops",
              "ratio_vs_faiss", "ratio_vs_torch_addmm", "repeats", "check", "note",
              "cpu", "cores", "threads", "loadavg", "torch", "fastgen", "date"]


# --------------------------------------------------------------------------- providers

def _fastgen(precision):
    def make(queries, keys, k):
        from fastgen.ops import knn
        return lambda: knn(queries, keys, k, backend="cpp", precision=precision)
    return make


def _torch_addmm(queries, keys, k):
    from fastgen.ops import baselines
    return lambda: baselines.knn_addmm(queries, keys, k)


def _torch_cdist(queries, keys, k):
    from fastgen.ops import baselines
    return lambda: baselines.knn_cdist(queries, keys, k)


def _faiss(queries, keys, k):
    import faiss
    import numpy as np
    faiss.omp_set_num_threads(torch.get_num_threads())
    q, kb = queries.numpy(), keys.numpy()  # zero-copy views of the same fp32 inputs

    def run():
        # The index is built inside the timed call: the other providers also take
        # fresh keys every call (IMLE redraws its samples), and the copy faiss makes
        # of the keys is part of its memory.
        index = faiss.IndexFlatL2(kb.shape[1])
        index.add(kb)
        dist, idx = index.search(q, k)
        return torch.from_numpy(dist), torch.from_numpy(idx.astype(np.int64, copy=False))
    return run


# name -> make(queries, keys, k) returning a no-argument callable -> (dist, idx)
PROVIDERS = {
    "fastgen-cpp": _fastgen("fp32"),
    "fastgen-cpp-bf16": _fastgen("bf16"),  # cross term in bf16, certified exact by re-ranking
    "torch-addmm": _torch_addmm,
    "torch-cdist": _torch_cdist,
    "faiss": _faiss,
}


def provider_unavailable(name):
    """None when `name` can run here, otherwise why not."""
    if name not in PROVIDERS:
        return f"unknown provider {name!r} (known: {', '.join(PROVIDERS)})"
    if name.startswith("fastgen-cpp"):
        from fastgen import _ext
        return None if _ext.CPP_AVAILABLE else f"C++ extension not built: {_ext.CPP_ERROR}"
    if name == "faiss":
        try:
            import faiss  # noqa: F401
        except ImportError as exc:
            return f"faiss does not import ({exc}); pip install faiss-cpu"
    return None


def available_providers():
    return [p for p in PROVIDERS if provider_unavailable(p) is None]


def make_inputs(N, M, D, seed=0):
    """The same float32 (queries, keys) for every provider and process: standard normal, seeded."""
    g = torch.Generator().manual_seed(seed)
    queries = torch.randn(N, D, generator=g)
    keys = torch.randn(M, D, generator=g)
    return queries, keys


def knn_flops(N, M, D):
    # the cross term q.k dominates: one multiply-add per (query, key, dim)
    return 2.0 * N * M * D


# --------------------------------------------------------------------------- timing and memory

def time_fn(fn, repeats=5, warmup=1):
    """Median, p20 and p80 wall time (seconds) of `fn()` over `repeats` calls, after `warmup` calls."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    t = torch.tensor(times, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)).tolist()
    return {"median_s": q[0], "p20_s": q[1], "p80_s": q[2]}


# How peak memory is measured (CPU, honestly):
# - Each (provider, shape) runs in a fresh `python -c` process, so nothing the
#   parent or another provider allocated (allocator caches, faiss/BLAS buffers) is
#   counted or reused.
# - In the child the inputs are built, then one tiny call (64 queries) runs so that
#   the libraries' one-time start-up (code pages, thread pools) is not charged to
#   the first k. The index is not built and the warm-up has not run yet.
# - Then, per k: freed heap is handed back to the OS (glibc malloc_trim), the
#   peak-RSS high-water mark is reset to the current RSS (`echo 5 >
#   /proc/self/clear_refs`) and that RSS is the baseline; after the warm-up and the
#   timed runs the high-water mark is read again. peak_mb = mark - baseline: the
#   most memory the op needed on top of its inputs at any moment, outputs and freed
#   temporaries included. Trimming and resetting per k means an earlier k's freed
#   buffers cannot hide a later k's allocations, so the k values share one process.
# - The mark is VmHWM from /proc/self/status, not getrusage().ru_maxrss: ru_maxrss
#   also carries the peak of the image that exec'd the child (measured here: a child
#   of a 500 MB parent starts with ru_maxrss = 500 MB) and clear_refs cannot reset
#   it. Without /proc we fall back to ru_maxrss and the row's note says peak_mb may
#   read low.

def _proc_status_kb(field):
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field}:\s+(\d+)\s+kB", f.read(), re.M)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def _release_free_heap():
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


RESULT_TAG = "FASTGEN_BENCH_RESULT "


def run_child(argv, timeout=None):
    """Run one measurement in a fresh process that imports this same fastgen.

    The child prints its result as one JSON line behind RESULT_TAG. Returns the parsed
    result, or a string saying why there is none (timeout, crash, out of memory).
    """
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout} s"
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    tail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
    if proc.returncode < 0:
        tail = f"killed by signal {-proc.returncode} (out of memory?); {tail}"
    return tail


def _reset_peak_kb():
    """Reset the high-water mark to the current RSS; return (baseline kB, method)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        rss = _proc_status_kb("VmRSS")
        if rss is not None:
            return rss, "VmHWM"
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss"


def _peak_kb(method):
    if method == "VmHWM":
        return _proc_status_kb("VmHWM")
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _measure_here(provider, N, M, D, k_values, repeats, seed, threads):
    """Body of the child process: build inputs; per k reset the peak, warm up, time, read the peak."""
    import gc
    torch.set_num_threads(threads)
    queries, keys = make_inputs(N, M, D, seed)
    # one tiny call first: library start-up (code pages, thread pools, BLAS buffers)
    # is a fixed cost paid once per process, not the op's working memory
    small_keys = keys[:min(M, max(256, max(k_values)))]
    with torch.no_grad():
        PROVIDERS[provider](queries[:64].clone(), small_keys.clone(), max(k_values))()
    results = []
    for k in k_values:
        fn = PROVIDERS[provider](queries, keys, k)
        gc.collect()
        _release_free_heap()
        base_kb, method = _reset_peak_kb()
        with torch.no_grad():
            t = time_fn(fn, repeats=repeats, warmup=1)
        peak_kb = _peak_kb(method)
        t["peak_mb"] = max(0, peak_kb - base_kb) / 1024.0
        t["mem_method"] = method
        results.append(t)
        del fn
    return results


def _child_main(spec_json):
    spec = json.loads(spec_json)
    out = _measure_here(**spec)
    print(RESULT_TAG + json.dumps(out), flush=True)


def measure_in_subprocess(provider, N, M, D, k_values, repeats=5, seed=0, threads=None, timeout=None):
    """Time one provider on one shape for each k, in a fresh Python process.

    Returns one dict per k with median_s, p20_s, p80_s, peak_mb; on failure or
    timeout the dicts have NaN timings and an `error` string instead.
    """
    k_values = [int(k) for k in k_values]
    spec = {"provider": provider, "N": N, "M": M, "D": D, "k_values": k_values, "repeats": repeats,
            "seed": seed, "threads": threads or torch.get_num_threads()}
    code = "import sys; from fastgen.benchmarking import _child_main; _child_main(sys.argv[1])"
    result = run_child([sys.executable, "-c", code, json.dumps(spec)], timeout)
    if isinstance(result, str):
        nan = float("nan")
        return [{"median_s": nan, "p20_s": nan, "p80_s": nan, "peak_mb": nan, "error": result} for _ in k_values]
    return result


# --------------------------------------------------------------------------- correctness guard

def check_against_cpp(queries, keys, k, providers, n_check=CHECK_QUERIES, rtol=1e-4):
    """Compare each provider's indices with fastgen-cpp's on the first `n_check` queries.

    A query is left out when its top-(k+1) exact distances (fastgen-cpp, exact by
    contract) have two neighbours within `rtol` of each other: there any order is a
    defensible fp32 answer. Returns {provider: "ok" | "mismatch a/b" | "skipped: why"}
    and warns on every mismatch; never raises.
    """
    from fastgen import _ext
    from fastgen.ops import knn
    if not _ext.CPP_AVAILABLE:
        return {p: "skipped: no fastgen-cpp" for p in providers}
    q = queries[:n_check].contiguous()
    kk = min(k + 1, keys.shape[0])
    with torch.no_grad():
        ref_d, ref_i = knn(q, keys, kk, backend="cpp")
    ref_d = ref_d.double()
    gaps = ref_d[:, 1:] - ref_d[:, :-1]
    tied = (gaps <= rtol * ref_d[:, 1:].abs().clamp_min(1e-12)).any(1) if kk > 1 \
        else torch.zeros(q.shape[0], dtype=torch.bool)
    keep = ~tied
    out = {}
    for p in providers:
        if p == "fastgen-cpp":
            out[p] = "ok"
            continue
        try:
            with torch.no_grad():
                _, idx = PROVIDERS[p](q, keys, k)()
        except Exception as exc:  # a provider that crashes here will crash when timed too
            out[p] = f"skipped: {type(exc).__name__}: {exc}"
            warnings.warn(f"{p} failed the correctness check: {exc}", stacklevel=2)
            continue
        bad = (idx.long()[:, :k] != ref_i[:, :k]).any(1) & keep
        n_bad, n_kept = int(bad.sum()), int(keep.sum())
        if n_bad:
            first = int(bad.nonzero()[0, 0])
            out[p] = f"mismatch {n_bad}/{n_kept}"
            warnings.warn(f"knn {tuple(queries.shape)}x{tuple(keys.shape)} k={k}: {p} disagrees with "
                          f"fastgen-cpp on {n_bad} of {n_kept} untied queries (first: query {first}, "
                          f"got {idx[first, :k].tolist()}, expected {ref_i[first, :k].tolist()})",
                          stacklevel=2)
        else:
            out[p] = "ok"
    return out


# --------------------------------------------------------------------------- suite

def machine_info():
    """CPU model, cores, torch threads, versions and the date, for every row."""
    import fastgen
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        import platform
        model = platform.processor() or "unknown"
    try:  # other work on the machine makes timings noisy: record it next to them
        load = round(os.getloadavg()[0], 2)
    except OSError:
        load = float("nan")
    return {"cpu": model, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "loadavg": load,
            "torch": torch.__version__, "fastgen": fastgen.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def machine_line(info=None):
    info = info or machine_info()
    line = (f"CPU: {info['cpu']} ({info['cores']} cores), torch threads {info['threads']}, "
            f"torch {info['torch']}, fastgen {info['fastgen']}, {info['date']}, "
            f"load average {info.get('loadavg', float('nan')):.2f} at start")
    if info.get("loadavg", 0) > 0.5 * (info["cores"] or 1):
        line += " (busy machine: timings are noisy)"
    return line


def add_ratios(rows):
    """ratio_vs_<baseline> = median time / the baseline's median for the same (op, shape, k).

    Below 1 means faster than the baseline. Only rows of one run are compared.
    """
    medians = {(r["op"], r["N"], r["M"], r["D"], r["k"], r["provider"]): r["median_s"] for r in rows}
    for r in rows:
        for base in BASELINES:
            b = medians.get((r["op"], r["N"], r["M"], r["D"], r["k"], base))
            ok = b is not None and b == b and b > 0 and r["median_s"] == r["median_s"]
            r["ratio_vs_" + base.replace("-", "_")] = r["median_s"] / b if ok else float("nan")
    return rows


def run_knn_suite(shapes=None, k_values=None, providers=None, repeats=5, seed=0, timeout=None,
                  check=True, progress=None):
    """Time every (shape, k, provider), each in a fresh process; return one row dict per triple.

    shapes: list of (N, M, D), default DEFAULT_SHAPES; k_values: default DEFAULT_K;
    providers: names from PROVIDERS, default all that can run here (unavailable ones
    are skipped with a warning); progress: optional callable taking one line of text.
    """
    shapes = [tuple(int(v) for v in s) for s in (shapes or DEFAULT_SHAPES)]
    k_values = [int(k) for k in (k_values or DEFAULT_K)]
    if providers is None:
        providers = available_providers()
    else:
        unknown = [p for p in providers if p not in PROVIDERS]
        if unknown:
            raise ValueError(f"unknown provider(s) {', '.join(unknown)}; known: {', '.join(PROVIDERS)}")
        for p in providers:
            why = provider_unavailable(p)
            if why:
                warnings.warn(f"skipping provider {p}: {why}", stacklevel=2)
        providers = [p for p in providers if provider_unavailable(p) is None]
    if not providers:
        raise RuntimeError("no benchmark provider can run here")
    info = machine_info()
    threads = info["threads"]
    for (N, M, D) in shapes:
        for k in k_values:
            if not 1 <= k <= M:
                raise ValueError(f"k={k} is out of range for M={M} keys")
    rows = []
    for (N, M, D) in shapes:
        checks = {}
        if check:  # before any timing; inputs rebuilt from the seed, exactly as the children do
            queries, keys = make_inputs(N, M, D, seed)
            checks = {k: check_against_cpp(queries, keys, k, providers) for k in k_values}
            del queries, keys
        by_provider = {}
        for p in providers:
            by_provider[p] = measure_in_subprocess(p, N, M, D, k_values, repeats=repeats, seed=seed,
                                                   threads=threads, timeout=timeout)
            if progress:
                for k, res in zip(k_values, by_provider[p]):
                    progress(f"{OP} {N}x{M}x{D} k={k:<3d} {p:17s} "
                             + (res["error"] if "error" in res else
                                f"{res['median_s'] * 1e3:10.2f} ms  {res['peak_mb']:8.1f} MB"))
        for i, k in enumerate(k_values):
            for p in providers:
                res = by_provider[p][i]
                note = res.get("error", "")
                if res.get("mem_method") == "ru_maxrss":
                    note = (note + "; " if note else "") + "peak via ru_maxrss (may read low)"
                med = res["median_s"]
                rows.append({"op": OP, "N": N, "M": M, "D": D, "k": k, "provider": p,
                             "median_s": med, "p20_s": res["p20_s"], "p80_s": res["p80_s"],
                             "peak_mb": res["peak_mb"],
                             "gflops": knn_flops(N, M, D) / med / 1e9 if med == med and med > 0 else float("nan"),
                             "repeats": repeats, "check": checks.get(k, {}).get(p, "not run"), "note": note,
                             **info})
    return add_ratios(rows)


# --------------------------------------------------------------------------- output

def append_csv(rows, path):
    """Append rows to a CSV (header written when the file is new); returns the path."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fields = CSV_FIELDS
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), None)
        if header:
            fields = header  # keep the file's columns; unknown ones are left blank
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore", restval="")
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({key: (f"{v:.6g}" if isinstance(v, float) else v) for key, v in r.items()})
    return path


def _fmt(v, spec):
    return "-" if v is None or v != v else format(v, spec)


def format_table(rows, info=None):
    """A plain-text table of `rows` with the machine line on top."""
    info = info or (rows[0] if rows else machine_info())
    head = ["shape (NxMxD)", "k", "provider", "median ms", "p20 ms", "p80 ms", "GFLOP/s", "peak MB",
            "x faiss", "x addmm", "check"]
    body = []
    for r in rows:
        body.append([f"{r['N']}x{r['M']}x{r['D']}", str(r["k"]), r["provider"],
                     _fmt(r["median_s"] * 1e3, ".2f"), _fmt(r["p20_s"] * 1e3, ".2f"),
                     _fmt(r["p80_s"] * 1e3, ".2f"), _fmt(r["gflops"], ".1f"), _fmt(r["peak_mb"], ".1f"),
                     _fmt(r.get("ratio_vs_faiss"), ".2f"), _fmt(r.get("ratio_vs_torch_addmm"), ".2f"),
                     r.get("check", "") + (f" ({r['note']})" if r.get("note") else "")])
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    left = {0, 2, 10}

    def line(cells):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    out = [machine_line(info),
           "x faiss / x addmm: median time divided by faiss's / torch-addmm's in this run (< 1 = faster)",
           line(head), line(["-" * w for w in widths])]
    out += [line(b) for b in body]
    return "\n".join(out)
