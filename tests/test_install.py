"""The install story (issue 13): a second `make` reuses the build, an installed torch is
kept, nothing pins torch from above."""
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


@needs_make
def test_install_is_up_to_date_after_make_test():
    """`make test` / `make demo` ran `make install` first: asking again must find nothing
    to do (no pip, no compiler) -- the old phony target rebuilt everything every time."""
    r = subprocess.run(["make", "-q", "install"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, "make install would rebuild: " + subprocess.run(
        ["make", "-n", "install"], cwd=ROOT, capture_output=True, text=True).stdout[-2000:]


@needs_make
def test_an_installed_torch_is_kept(tmp_path):
    r = subprocess.run(["make", "-B", f"STAMPS={tmp_path}", f"{tmp_path}/torch"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "keeping the installed torch" in r.stdout
    assert "installing torch" not in r.stdout


def test_no_upper_bound_on_torch():
    text = open(os.path.join(ROOT, "pyproject.toml")).read()
    assert "torch>=2.4" in text and "torch>=2.4," not in text and "<=2.13" not in text


def test_demo_installs_the_benchmark_peers():
    text = open(os.path.join(ROOT, "Makefile")).read()
    assert "demo: install-bench" in text and "install-bench: $(STAMPS)/deps-bench" in text
