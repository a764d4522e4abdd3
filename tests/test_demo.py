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


def _parses(args):
    from fastgen.cli import build_parser
    return build_parser().parse_args(args)


def test_every_stage_of_the_demo_and_the_quality_table_is_a_valid_command():
    import importlib.util
    import os
    spec = importlib.util.spec_from_file_location(
        "digits_quality", os.path.join(os.path.dirname(__file__), "..", "benchmarks", "digits_quality.py"))
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    for _, args in demo.stages("o") + quality.stages("q"):
        assert callable(_parses(args).func)
    # the quality table's folders are the ones `fastgen eval --table` reads
    names = {n for n, _ in quality.stages("q")}
    assert {"ae", "vae", "vqvae", "pixelcnn", "imle", "vqvae2", "prior-top", "prior-bottom", "transformer"} <= names
