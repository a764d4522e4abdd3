"""The install story: a second `make` reuses the build, an installed torch is kept, nothing
pins torch from above, and a fresh environment (or one where another clone of fastgen is
installed) gets the package and its extras installed."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


@needs_make
def test_install_is_up_to_date_after_make_test():
    """`make test` / `make demo` ran `make install` first: asking again must find nothing
    to do (no pip, no compiler) -- the old phony target rebuilt everything every time."""
    py = f"PY={sys.executable}"
    r = subprocess.run(["make", "-q", "install", py], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, "make install would rebuild: " + subprocess.run(
        ["make", "-n", "install", py], cwd=ROOT, capture_output=True, text=True).stdout[-2000:]


@needs_make
def test_an_installed_torch_is_kept(tmp_path):
    r = subprocess.run(["make", "-B", f"PY={sys.executable}", f"STAMPS={tmp_path}", f"{tmp_path}/torch"], cwd=ROOT,
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


def _fresh_venv(path):
    """A venv with nothing in it (not even pip: a dry run needs only its interpreter)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    return os.path.join(str(path), "bin", "python")


def _dry_run_install(python):
    r = subprocess.run(["make", "-n", "install", f"PY={python}"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


@needs_make
def test_a_fresh_venv_gets_the_package_and_its_test_extra(tmp_path):
    """The stamps that say "installed" belong to one environment: a new venv with nothing
    in it must install torch, the package with its test extra and the test peer (with the
    stamps declared phony, make searched no pattern rule and installed nothing)."""
    plan = _dry_run_install(_fresh_venv(tmp_path / "venv"))
    assert '-e ".[test]"' in plan, plan[-2000:]
    assert "pytorch-fid" in plan and "ninja" in plan, plan[-2000:]


@needs_make
def test_another_installed_clone_is_replaced_by_this_one(tmp_path):
    """Where `import fastgen` leads to another clone, this checkout is installed again."""
    python = _fresh_venv(tmp_path / "venv")
    other = tmp_path / "other-clone"
    (other / "fastgen").mkdir(parents=True)
    (other / "fastgen" / "__init__.py").write_text("")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(site, "other_clone.pth"), "w") as f:
        f.write(str(other) + "\n")
    found = subprocess.run([python, "-c", "import fastgen; print(fastgen.__file__)"], cwd="/",
                           capture_output=True, text=True, check=True).stdout
    assert str(other) in found
    assert '-e ".[test]"' in _dry_run_install(python)


@needs_make
def test_this_environment_builds_nothing_more():
    """After `make test` here, `make demo`'s install step installs its extra and builds no
    extension: the extension's torch stamp matches this environment's torch."""
    r = subprocess.run(["make", "-n", "install-bench", f"PY={sys.executable}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "build_ext" not in r.stdout, r.stdout[-2000:]
