"""Every code line of the README runs: its Python blocks are executed as they are, and
every `fastgen ...` command line of its shell blocks parses with the real CLI parser
(the long jobs themselves run in `make demo` and in the CLI tests)."""
import os
import re
import shlex

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def blocks(lang):
    with open(README) as f:
        return re.findall(rf"```{lang}\n(.*?)```", f.read(), re.S)


def test_readme_has_code():
    assert blocks("python") and blocks("bash")


@pytest.mark.parametrize("i", range(len(blocks("python"))))
def test_python_block_runs(i):
    exec(compile(blocks("python")[i], f"README.md python block {i}", "exec"), {})


def _commands():
    out = []
    for block in blocks("bash"):
        for line in block.splitlines():
            line = line.split("  #")[0].split(" # ")[0].strip()
            if "fastgen.cli " in line:
                line = "fastgen " + line.split("fastgen.cli ", 1)[1]
            if line.startswith("fastgen "):
                out.append(line)
    return out


@pytest.mark.parametrize("line", _commands())
def test_cli_line_parses(line, monkeypatch):
    from fastgen.cli import build_parser
    argv = [a for a in shlex.split(line)[1:] if not (a.startswith("[") and a.endswith("]"))]
    args = build_parser().parse_args(argv)     # an unknown flag or subcommand exits here
    assert callable(args.func)


def test_make_targets_the_readme_names_exist():
    with open(os.path.join(os.path.dirname(README), "Makefile")) as f:
        targets = set(re.findall(r"^([a-z-]+):", f.read(), re.M))
    named = {m for b in blocks("bash") for m in re.findall(r"^make (\w+)", b, re.M)}
    assert named and named <= targets, named - targets


def test_every_file_the_readme_points_at_is_in_the_repository():
    # a user's clone has only the repository: no ../ paths, every linked file present
    root = os.path.dirname(README)
    with open(README) as f:
        text = f.read()
    targets = re.findall(r"\]\(([^)#]+)\)", text) + re.findall(r"`((?:\.\./|docs/|benchmarks/)[^`\s]+)`", text)
    local = [t for t in targets if "://" not in t]
    assert local
    outside = [t for t in local if os.path.normpath(t).startswith("..")]
    assert not outside, outside
    missing = [t for t in local if "<" not in t and "*" not in t and not os.path.exists(os.path.join(root, t))]
    assert not missing, missing
