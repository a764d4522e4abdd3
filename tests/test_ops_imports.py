"""fastgen.ops is layered: no import cycle between its modules, and no function-local
import of a fastgen module except the optional Triton kernels (which need triton)."""
import ast
import pathlib

OPS = pathlib.Path(__file__).resolve().parent.parent / "fastgen" / "ops"
OPTIONAL = ("fastgen.ops.certified", "fastgen.ops.triton")   # import triton at module level


def _module_names():
    return {p.stem for p in OPS.glob("*.py") if p.stem != "__init__"}


def _imports(path, names):
    """(module-level fastgen.ops modules imported, function-local fastgen imports)."""
    tree = ast.parse(path.read_text())
    top, local = set(), []

    def targets(node):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "fastgen.ops":
                return [f"fastgen.ops.{a.name}" for a in node.names if a.name in names]
            if node.module.startswith("fastgen"):
                return [node.module]
        if isinstance(node, ast.Import):
            return [a.name for a in node.names if a.name.startswith("fastgen")]
        return []

    for node in tree.body:
        for t in targets(node):
            if t.startswith("fastgen.ops.") and t.split(".")[2] in names:
                top.add(t.split(".")[2])
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                local += targets(node)
    return top, local


def test_no_cycles_and_no_local_imports():
    names = _module_names()
    graph, local = {}, {}
    for n in names:
        graph[n], local[n] = _imports(OPS / f"{n}.py", names)
    bad_local = {n: [t for t in ts if not t.startswith(OPTIONAL)] for n, ts in local.items()}
    assert {n: ts for n, ts in bad_local.items() if ts} == {}
    # depth-first search for a cycle
    state = {}

    def visit(n, path):
        if state.get(n) == "done":
            return
        assert state.get(n) != "open", "import cycle: " + " -> ".join(path + [n])
        state[n] = "open"
        for m in sorted(graph[n]):
            visit(m, path + [n])
        state[n] = "done"

    for n in sorted(names):
        visit(n, [])
    assert "knn" in graph["patch_index"] and "pruned_knn" in graph["knn"]   # the walk saw real edges


def test_a_cycle_would_be_found(tmp_path):
    """The walk above on a graph with a planted cycle."""
    (tmp_path / "a.py").write_text("from fastgen.ops import b\n")
    (tmp_path / "b.py").write_text("from fastgen.ops.a import x\n\ndef f():\n    from fastgen.ops import a\n")
    ga, _ = _imports(tmp_path / "a.py", {"a", "b"})
    gb, lb = _imports(tmp_path / "b.py", {"a", "b"})
    assert ga == {"b"} and gb == {"a"} and lb == ["fastgen.ops.a"]
