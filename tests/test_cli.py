"""How the `fastgen` command line reports errors: user errors in one line (exit 2),
fastgen's own bugs with their traceback (exit 1), --debug always with the traceback."""
import pytest

import fastgen.commands.doctor as doctor
from fastgen.cli import main


def _raising(exc):
    def run(args):
        raise exc
    return run


def test_user_error_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(doctor, "run", _raising(ValueError("--size must look like HxW")))
    assert main(["doctor"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "fastgen doctor: error: --size must look like HxW (--debug shows the traceback)"


@pytest.mark.parametrize("exc", [
    RuntimeError("internal error in patch_nn's pruned pass 2: query 3 found no key (please report with the inputs)"),
    KeyError("level"),
    AttributeError("'NoneType' object has no attribute 'shape'"),
])
def test_internal_error_shows_the_traceback(monkeypatch, capsys, exc):
    monkeypatch.setattr(doctor, "run", _raising(exc))
    assert main(["doctor"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and type(exc).__name__ in err
    assert "please report it" in err


def test_debug_shows_the_traceback_of_user_errors(monkeypatch, capsys):
    monkeypatch.setattr(doctor, "run", _raising(FileNotFoundError("image file not found: 'x.png'")))
    assert main(["--debug", "doctor"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert err.splitlines()[-1] == "fastgen doctor: error: image file not found: 'x.png'"
