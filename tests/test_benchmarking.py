"""The benchmark harness (fastgen/benchmarking.py) end to end: a suite file run through
pytest-benchmark, its JSON rendered by benchmarks/report.py, and the correctness guard
refusing to time a wrong answer."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SUITE_FILE = '''
import torch
from fastgen.benchmarking import Provider, Suite, cases


def inputs(p):
    return torch.arange(p["n"], dtype=torch.float32)


def check(p, x, mode, provider, out):
    return "ok" if torch.equal(out, x * 2) else "wrong sum"


SUITE = Suite(
    op="double", cases=cases(quick=[dict(n=7)], large=[dict(n=1 << 20)]),
    providers={"mul": Provider(lambda x, p, mode: (lambda: x * 2)),
               "add": Provider(lambda x, p, mode: (lambda: x + x)),
               "broken": Provider(lambda x, p, mode: (lambda: x + 1)),
               "missing": Provider(lambda x, p, mode: (lambda: x), requires=("no_such_module_xyz",))},
    inputs=inputs, check=check, work=lambda p, mode: {"bytes": 8.0 * p["n"]}, baselines=("mul",),
    rounds=(2, 1), file=__file__)

test_double = SUITE.pytest_test()
'''


def run_suite(tmp_path, *extra):
    (tmp_path / "bench_double.py").write_text(SUITE_FILE)
    (tmp_path / "conftest.py").write_text("from fastgen.benchmarking import pytest_addoption  # noqa: F401\n")
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, "-m", "pytest", str(tmp_path / "bench_double.py"), "--benchmark-only",
                           f"--benchmark-json={out}", "-p", "no:cacheprovider", "-rA",
                           *(extra or ("-k", "quick"))],
                          capture_output=True, text=True, cwd=tmp_path)
    return proc, out


def test_suite_runs_guards_and_reports(tmp_path):
    proc, out = run_suite(tmp_path)
    assert proc.returncode == 1, proc.stdout[-2000:]           # the broken provider fails ...
    assert "double quick-n7 forward broken: wrong answer, not timed: wrong sum" in proc.stdout
    assert "no_such_module_xyz is not installed" in proc.stdout  # ... the missing one is skipped
    data = json.loads(out.read_text())
    timed = {b["extra_info"]["provider"]: b for b in data["benchmarks"]}
    assert set(timed) == {"mul", "add"}                         # ... and neither was timed
    for b in timed.values():
        assert b["extra_info"]["check"] == "ok" and b["stats"]["rounds"] == 2
        assert b["extra_info"]["peak_mb"] is not None and b["extra_info"]["peak_mb"] >= 0

    from fastgen.benchmarking import rows_from_json
    rows = rows_from_json(str(out))
    assert {r["provider"]: r["ratio_vs_mul"] for r in rows}["mul"] == pytest.approx(1.0)
    assert all(r["gb_per_s"] > 0 and r["p20_s"] <= r["median_s"] <= r["p80_s"] for r in rows)

    results = tmp_path / "results"
    results.mkdir()
    (results / "RESULTS.md").write_text("# results\n\n<!-- other:begin -->\nkept\n<!-- other:end -->\n")
    rep = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "report.py"), str(out),
                          "--out-dir", str(results)], capture_output=True, text=True)
    assert rep.returncode == 0, rep.stderr
    md = (results / "RESULTS.md").read_text()
    assert "kept" in md and "<!-- double:begin -->" in md and "| 7 | forward | add |" in md
    assert "vs mul" in md


def test_rounds_and_no_peak_memory_options(tmp_path):
    proc, out = run_suite(tmp_path, "--benchmark-rounds", "3", "--benchmark-no-peak-memory",
                          "-k", "quick and not broken")
    assert proc.returncode == 0, proc.stdout[-2000:]
    ran = json.loads(out.read_text())["benchmarks"]
    assert sorted(b["extra_info"]["provider"] for b in ran) == ["add", "mul"]
    for b in ran:
        assert b["stats"]["rounds"] == 3 and "peak_mb" not in b["extra_info"]


def test_agrees_with_compares_every_provider_to_the_named_one():
    from fastgen.benchmarking import agrees_with
    calls = []

    def make(x, p, mode):
        calls.append(p["n"])
        return lambda: x * 2
    check = agrees_with("exact", make, lambda out, ref: None if out == ref else f"{out} vs {ref}")
    assert check({"n": 1}, 3, "forward", "exact", 6) == "ok" and calls == []     # its own run is the reference
    assert check({"n": 1}, 3, "forward", "other", 7) == "differs from exact: 7 vs 6"
    assert check({"n": 2}, 5, "forward", "other", 10) == "ok" and calls == [2]   # computed once for a new case
    assert check({"n": 2}, 5, "forward", "other", 10) == "ok" and calls == [2]
