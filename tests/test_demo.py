"""`make demo`'s runner (fastgen/demo.py): stages timed and tabled, and a folder it did not
make is never emptied."""
import json

import pytest

from fastgen import demo


def test_stages_run_timed_and_tabled(tmp_path, capsys):
    out = tmp_path / "demo-out"
    assert demo.main(["--out", str(out), "--only", "doctor"]) == 0
    timings = json.loads((out / "timings.json").read_text())
    assert [s["name"] for s in timings["stages"]] == ["doctor"]
    assert timings["stages"][0]["seconds"] > 0
    printed = capsys.readouterr().out
    assert "[demo] doctor:" in printed and "total" in printed
    # a second run may empty the folder it made itself
    assert demo.main(["--out", str(out), "--only", "doctor"]) == 0


def test_a_users_folder_is_never_emptied(tmp_path):
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "keep.jpg").write_bytes(b"x")
    with pytest.raises(SystemExit) as e:
        demo.main(["--out", str(mine), "--only", "doctor"])
    assert e.value.code == 2
    assert (mine / "keep.jpg").exists()


def test_every_stage_has_a_name_and_a_command():
    names = [n for n, _ in demo.stages("o")]
    assert len(names) == len(set(names)) >= 10
    assert any(args[:2] == ["gpnn", "sample"] for _, args in demo.stages("o"))


def test_an_unknown_stage_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(SystemExit) as e:
        demo.main(["--out", str(tmp_path / "o"), "--only", "no such stage"])
    assert e.value.code == 2
    assert not (tmp_path / "o").exists()
