"""The one benchmark harness: every op's suite runs through it, under pytest-benchmark.

A suite (benchmarks/bench_<op>.py) defines only what is particular to its op -- the
cases, how to build the inputs, the providers, and how to judge an answer -- as a
`Suite`, and exposes `test_<op> = SUITE.pytest_test()`. The harness does the rest, the
same way for every op:

    pytest benchmarks/ --benchmark-only --benchmark-json=out.json      # everything
    pytest benchmarks/bench_knn.py --benchmark-only -k quick            # small cases
    pytest-benchmark compare out1.json out2.json                        # across runs
    python benchmarks/report.py out.json                                # RESULTS.md sections + plots

For each (case, mode, provider), in this order:
1. inputs from the suite (seeded, the same for every provider);
2. the correctness guard, before any timing: the provider's answer is judged by the
   suite's `check` (against the float64 truth or the exact fastgen result); a wrong
   answer fails the benchmark instead of producing a number;
3. timing by pytest-benchmark (`pedantic`: `rounds` calls; the checked call was the
   warm-up, or one untimed call when the suite has no check);
4. peak memory in a fresh process (`measure_peak_memory`, method below), unless
   `--benchmark-no-peak-memory`;
5. extra_info for the report: op, case parameters, mode, provider, flops or bytes of
   useful work, the check's verdict, peak MB, the machine.

`fastgen bench` runs these same suites (it calls pytest on benchmarks/ and prints the
report's table).
"""
import contextlib
import datetime
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch

RESULT_TAG = "FASTGEN_BENCH_RESULT "


# --------------------------------------------------------------------------- suites

@dataclass(frozen=True)
class Case:
    """One input configuration of a suite: named parameters, and whether it is quick."""
    params: tuple                # ((name, value), ...) in display order
    quick: bool = True

    @property
    def p(self):
        return dict(self.params)

    @property
    def id(self):
        return ("quick-" if self.quick else "large-") + "-".join(f"{k}{v}" for k, v in self.params)


def cases(quick, large=()):
    """Case list from dicts: the quick ones, then the large (slow-marked) ones."""
    return ([Case(tuple(c.items()), True) for c in quick] + [Case(tuple(c.items()), False) for c in large])


@dataclass
class Provider:
    """make(inputs, params, mode) -> a no-argument callable doing one timed call.
    requires: modules that must import (else the provider is skipped, with the reason).
    opt_in: run only when named in --benchmark-providers (slow or compile-heavy).
    work: fn(params, mode) -> {"flops"|"bytes": ...} replacing the suite's work for this
    provider (a yardstick that does other work than the op, e.g. a memory copy)."""
    make: object
    requires: tuple = ()
    opt_in: bool = False
    needs_cpp: bool = False
    work: object = None


@dataclass
class Suite:
    """What a benchmark file defines. inputs(params) -> any object the providers take;
    check(params, inputs, mode, provider, out) -> "ok" (or "ok (detail)", the detail kept
    in the report's check column) or a string saying what is wrong (None: no guard);
    work(params, mode) -> {"flops": ...} or {"bytes": ...} of useful work (a Provider's
    own work replaces it for that provider); baselines: providers the report divides by
    (same run, same case and mode); rounds: timed calls per measurement (quick, large)."""
    op: str
    cases: list
    providers: dict
    inputs: object
    modes: tuple = ("forward",)
    check: object = None
    work: object = None
    baselines: tuple = ()
    rounds: tuple = (5, 3)
    file: str = ""
    _cache: dict = field(default_factory=dict, repr=False)

    def unavailable(self, name):
        """None when provider `name` can run here, else why not."""
        if name not in self.providers:
            return f"unknown provider {name!r} (known: {', '.join(self.providers)})"
        prov = self.providers[name]
        if prov.needs_cpp:
            from fastgen import _ext
            if not _ext.CPP_AVAILABLE:
                return f"C++ extension not built: {_ext.CPP_ERROR}"
        for mod in prov.requires:
            if importlib.util.find_spec(mod) is None:
                return f"{mod} is not installed"
        return None

    def build_inputs(self, case):
        """Inputs of `case`, built once per process (every provider gets the same)."""
        if case not in self._cache:
            self._cache.clear()    # one case's inputs at a time: large cases are large
            self._cache[case] = self.inputs(case.p)
        return self._cache[case]

    def pytest_test(self):
        """The parametrized pytest-benchmark test of this suite."""
        import pytest
        suite = self
        params = []
        for case in self.cases:
            marks = () if case.quick else (pytest.mark.slow,)
            for mode in self.modes:
                for name in self.providers:
                    params.append(pytest.param(case, mode, name, id=f"{case.id}-{mode}-{name}", marks=marks))

        @pytest.mark.parametrize("case, mode, provider", params)
        def test(benchmark, request, case, mode, provider):
            run_benchmark(suite, benchmark, request.config, case, mode, provider)
        test.__name__ = f"test_{self.op}"
        return test


# --------------------------------------------------------------------------- one benchmark

def run_benchmark(suite, benchmark, config, case, mode, provider):
    """Steps 1-5 of the module docstring for one (case, mode, provider)."""
    import pytest
    why = suite.unavailable(provider)
    if why:
        pytest.skip(why)
    chosen = config.getoption("benchmark_providers", None)
    if chosen is not None:
        if provider not in chosen.split(","):
            pytest.skip(f"not in --benchmark-providers={chosen}")
    elif suite.providers[provider].opt_in:
        pytest.skip("opt-in provider: name it in --benchmark-providers")
    inputs = suite.build_inputs(case)
    fn = suite.providers[provider].make(inputs, case.p, mode)
    verdict = "not checked"
    if suite.check is not None:
        with torch.no_grad() if mode == "forward" else contextlib.nullcontext():
            out = fn()
        verdict = suite.check(case.p, inputs, mode, provider, out)
        del out
        if not passed(verdict):
            pytest.fail(f"{suite.op} {case.id} {mode} {provider}: wrong answer, not timed: {verdict}")
    benchmark.group = f"{suite.op} {case.id} {mode}"
    rounds = config.getoption("benchmark_rounds", None) or suite.rounds[0 if case.quick else 1]
    info = {"op": suite.op, "case": case.id, "params": case.p, "mode": mode, "provider": provider,
            "check": verdict, "baselines": list(suite.baselines), "rounds": rounds,
            "command": shlex.join(["pytest", *sys.argv[1:]]), "busy_cores": _BUSY["n"], **machine_info()}
    work = suite.providers[provider].work or suite.work
    if work is not None:
        info.update(work(case.p, mode))
    with torch.no_grad() if mode == "forward" else contextlib.nullcontext():
        # the checked call above already warmed the provider up
        benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0 if suite.check else 1)
    if not config.getoption("benchmark_no_peak_memory", False) and not config.getoption("benchmark_disable", False):
        peak = measure_peak_memory(suite.file, case, mode, provider)
        info["peak_mb"] = peak if isinstance(peak, float) else None
        if not isinstance(peak, float):
            info["note"] = f"peak memory not measured: {peak}"
    benchmark.extra_info.update(info)


# --------------------------------------------------------------------------- shared peers and checks

def faiss_flat(queries, keys, k):
    """What users pick instead of fastgen's knn: a faiss IndexFlatL2 built over `keys` and
    searched, in one call (its copy of the keys is part of its cost). Torch (dist, idx)."""
    import faiss
    import numpy as np
    faiss.omp_set_num_threads(torch.get_num_threads())
    index = faiss.IndexFlatL2(keys.shape[1])
    index.add(keys.numpy())
    dist, idx = index.search(queries.numpy(), k)
    return torch.from_numpy(dist), torch.from_numpy(idx.astype(np.int64, copy=False))


def agrees_with(name, make, differs):
    """A Suite check for exact providers: each output against provider `name`'s on the same
    case -- taken from `name`'s own run when it comes first, else computed once by
    make(inputs, params, mode)() -- by differs(out, ref) -> None, or what differs. One
    case's reference is kept at a time."""
    cache = {}

    def check(p, x, mode, provider, out):
        key = (tuple(sorted(p.items())), mode)
        if key not in cache:
            cache.clear()
            cache[key] = out if provider == name else make(x, p, mode)()
        bad = differs(out, cache[key])
        return "ok" if bad is None else f"differs from {name}: {bad}"
    return check


def knn_verdict(queries, keys, idx, k, rows=256):
    """A knn answer's indices against fastgen's exact knn on the first `rows` queries whose
    k+1 nearest distances are not within 1e-4 (relative) of each other."""
    from fastgen.ops import knn
    kk = min(k + 1, keys.shape[0])
    ref_d, ref_i = knn(queries[:rows], keys, kk, prune=False)
    ref_d = ref_d.double()
    tied = (((ref_d[:, 1:] - ref_d[:, :-1]) <= 1e-4 * ref_d[:, 1:].abs().clamp_min(1e-12)).any(1) if kk > 1
            else torch.zeros(ref_d.shape[0], dtype=torch.bool))
    bad = (idx[:rows, :k].long() != ref_i[:, :k]).any(1) & ~tied
    return "ok" if not bad.any() else f"{int(bad.sum())} of {int((~tied).sum())} untied queries differ"


def passed(verdict):
    """Whether a check's verdict lets the provider be timed: "ok", or "ok (detail)"."""
    return verdict == "ok" or (isinstance(verdict, str) and verdict.startswith("ok ("))



def pytest_addoption(parser):
    """Options of the harness (benchmarks/conftest.py registers them)."""
    group = parser.getgroup("fastgen benchmarks")
    group.addoption("--benchmark-providers", default=None,
                    help="comma-separated providers to run (default: all available, opt-in ones excluded)")
    group.addoption("--benchmark-rounds", type=int, default=None,
                    help="timed calls per benchmark after the warm-up (default: the suite's)")
    group.addoption("--benchmark-no-peak-memory", action="store_true",
                    help="skip the fresh-process peak-memory measurement (halves the time)")
    group.addoption("--benchmark-busy-cores", type=int, default=0,
                    help="keep this many cores busy with spinning processes for the whole run (a shared "
                         "machine's state); every row records it")


@contextlib.contextmanager
def busy_cores(n):
    """n other processes spinning (one core each) while the block runs, stopped after it
    (also on an error): the state of a shared workstation or a CI runner, reproducibly."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(int(n))]
    try:
        if procs:
            time.sleep(0.2)   # let them reach the scheduler before anything is timed
        yield
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


_BUSY = {"n": 0, "cm": None}


def pytest_configure(config):
    """--benchmark-busy-cores N: the spinners start with the session."""
    n = config.getoption("benchmark_busy_cores", 0) or 0
    if n < 0:
        raise ValueError(f"--benchmark-busy-cores must be >= 0, got {n}")
    if n:
        _BUSY["n"], _BUSY["cm"] = n, busy_cores(n)
        _BUSY["cm"].__enter__()


def pytest_unconfigure(config):
    if _BUSY["cm"] is not None:
        _BUSY["cm"].__exit__(None, None, None)
        _BUSY["cm"] = None


# --------------------------------------------------------------------------- peak memory
#
# How peak memory is measured (CPU, honestly):
# - Each (case, mode, provider) runs in a fresh `python -c` process, so nothing the
#   parent or another provider allocated (allocator caches, faiss/BLAS buffers) is
#   counted or reused.
# - In the child the inputs are built and the provider is called once (library
#   start-up -- code pages, thread pools, BLAS buffers, compiled graphs -- is a fixed
#   cost paid once per process, not the op's working memory).
# - Then freed heap is handed back to the OS (glibc malloc_trim), the peak-RSS
#   high-water mark is reset to the current RSS (`echo 5 > /proc/self/clear_refs`) and
#   that RSS is the baseline; after one more call the high-water mark is read again.
#   peak_mb = mark - baseline: the most memory the op needed on top of its inputs at
#   any moment, outputs and freed temporaries included.
# - The mark is VmHWM from /proc/self/status, not getrusage().ru_maxrss: ru_maxrss
#   also carries the peak of the image that exec'd the child (a child of a 500 MB
#   parent starts with ru_maxrss = 500 MB) and clear_refs cannot reset it. Without
#   /proc we fall back to ru_maxrss and say so.

def _proc_status_kb(name):
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{name}:\s+(\d+)\s+kB", f.read(), re.M)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def release_free_heap():
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_kb():
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


def peak_kb(method):
    if method == "VmHWM":
        return _proc_status_kb("VmHWM")
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def load_suite(path):
    """The SUITE a benchmark file defines (imported by path: benchmarks/ is not a package)."""
    name = "fastgen_bench_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.SUITE


def _peak_child(spec_json):
    """Body of the fresh process: inputs, one call, reset the mark, one call, read it."""
    import gc
    spec = json.loads(spec_json)
    torch.set_num_threads(spec["threads"])
    suite = load_suite(spec["file"])
    case = Case(tuple((k, v) for k, v in spec["params"]), spec["quick"])
    inputs = suite.build_inputs(case)
    fn = suite.providers[spec["provider"]].make(inputs, case.p, spec["mode"])
    grad = contextlib.nullcontext() if spec["mode"] != "forward" else torch.no_grad()
    with grad:
        fn()
    gc.collect()
    release_free_heap()
    base, method = reset_peak_kb()
    with grad:
        fn()
    peak = peak_kb(method)
    print(RESULT_TAG + json.dumps({"peak_mb": max(0, peak - base) / 1024.0, "method": method}), flush=True)


def run_child(argv, timeout=None):
    """Run one measurement in a fresh process that imports this same fastgen. The child
    prints its result as one JSON line behind RESULT_TAG. Returns the parsed result, or
    a string saying why there is none (timeout, crash, out of memory)."""
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


def measure_peak_memory(suite_file, case, mode, provider, timeout=None):
    """Peak MB above the inputs of one call in a fresh process, or a string saying why not."""
    spec = {"file": os.path.abspath(suite_file), "params": list(case.params), "quick": case.quick, "mode": mode,
            "provider": provider, "threads": torch.get_num_threads()}
    code = "import sys; from fastgen.benchmarking import _peak_child; _peak_child(sys.argv[1])"
    result = run_child([sys.executable, "-c", code, json.dumps(spec)], timeout)
    if isinstance(result, str):
        return result
    return float(result["peak_mb"])


# --------------------------------------------------------------------------- machine

def machine_info():
    """CPU model, cores, torch threads, versions, load and the date, for every row."""
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


# --------------------------------------------------------------------------- results

def rows_from_json(*paths):
    """One row per benchmark of pytest-benchmark JSON files written through this harness:
    extra_info plus median_s, p20_s, p80_s (over the timed rounds), gflops / gb_per_s,
    and ratio_vs_<baseline> (median / the baseline's median for the same op, case and
    mode in the same file; < 1 = faster)."""
    rows = []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        file_rows = []
        for b in data.get("benchmarks", []):
            info = dict(b.get("extra_info") or {})
            if "op" not in info:
                continue
            t = torch.tensor(b["stats"]["data"], dtype=torch.float64)
            med, p20, p80 = torch.quantile(t, torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)).tolist()
            row = {**info, "median_s": med, "p20_s": p20, "p80_s": p80, "source": os.path.basename(path)}
            if "flops" in info:
                row["gflops"] = info["flops"] / med / 1e9
            if "bytes" in info:
                row["gb_per_s"] = info["bytes"] / med / 1e9
            file_rows.append(row)
        medians = {(r["op"], r["case"], r["mode"], r["provider"]): r["median_s"] for r in file_rows}
        for r in file_rows:
            for base in r.get("baselines", []):
                m = medians.get((r["op"], r["case"], r["mode"], base))
                r["ratio_vs_" + base] = r["median_s"] / m if m else None
        rows += file_rows
    return rows


def _fmt(v, spec):
    return "-" if v is None or (isinstance(v, float) and v != v) else format(v, spec)


def table(rows):
    """(header, body) of the results of one op: case parameters, mode, provider, times,
    throughput, peak memory, ratios to the baselines, the check."""
    names = list(dict.fromkeys(k for r in rows for k in r["params"]))
    bases = list(dict.fromkeys(b for r in rows for b in r.get("baselines", [])))
    rate = "GFLOP/s" if any("gflops" in r for r in rows) else "GB/s" if any("gb_per_s" in r for r in rows) else None
    head = names + ["mode", "provider", "median ms", "p20 ms", "p80 ms"] + ([rate] if rate else []) + \
        ["peak MB"] + [f"vs {b}" for b in bases] + ["check"]
    body = []
    for r in rows:
        cells = [str(r["params"][n]) if n in r["params"] else "" for n in names]
        cells += [r["mode"], r["provider"], _fmt(r["median_s"] * 1e3, ".2f"), _fmt(r["p20_s"] * 1e3, ".2f"),
                  _fmt(r["p80_s"] * 1e3, ".2f")]
        if rate:
            cells.append(_fmt(r.get("gflops", r.get("gb_per_s")), ".1f"))
        cells.append(_fmt(r.get("peak_mb"), ".1f"))
        cells += [_fmt(r.get("ratio_vs_" + b), ".2f") for b in bases]
        cells.append(r.get("check", "") + (f" ({r['note']})" if r.get("note") else ""))
        body.append(cells)
    return head, body


def format_table(rows):
    """Plain-text tables, one per op, each under its machine line."""
    out = []
    for op in dict.fromkeys(r["op"] for r in rows):
        op_rows = [r for r in rows if r["op"] == op]
        head, body = table(op_rows)
        widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
        line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
        out += [f"== {op} ==  " + machine_line(op_rows[0]),
                "vs X: median time divided by X's in this run (< 1 = faster)", line(head),
                line(["-" * w for w in widths])] + [line(b) for b in body] + [""]
    return "\n".join(out)


def markdown_section(op, rows, plot_name=None, json_paths=()):
    """The RESULTS.md section of one op, between <!-- op:begin --> and <!-- op:end -->;
    json_paths: the pytest-benchmark files the report was made from (named in the text)."""
    head, body = table(rows)
    r0 = rows[0]
    lines = [f"<!-- {op}:begin -->", f"## {op}", "",
             f"Command: `{r0.get('command', '?')}` (then "
             f"`{shlex.join(['python', 'benchmarks/report.py', *json_paths])}`)  ",
             f"Machine: {r0['cpu']}, {r0['cores']} cores, torch threads {r0['threads']}, torch {r0['torch']}, "
             f"fastgen {r0['fastgen']}, load average {r0['loadavg']} at start"
             + (f", {r0['busy_cores']} core(s) kept busy by a spinning process (--benchmark-busy-cores)"
                if r0.get("busy_cores") else "") + "  ",
             f"Date: {r0['date']}  ",
             f"Timing: pytest-benchmark, one warm-up call then {r0.get('rounds', '?')} timed calls per row; "
             "median, p20, p80 of those. Peak MB: one call in a fresh process, RSS high-water mark above the "
             "inputs (fastgen/benchmarking.py). Ratios: this row's median over the named provider's, same case "
             "and mode, same run. Every provider's answer passed the correctness check before it was timed.",
             "", "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(b) + " |" for b in body]
    if plot_name:
        lines += ["", f"![{op}: median time per provider]({plot_name})"]
    lines.append(f"<!-- {op}:end -->")
    return "\n".join(lines)
