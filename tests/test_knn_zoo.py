"""The kNN zoo's data (benchmarks/bench_knn_zoo.py) at small sizes: the pruned path and
the sweep give the float64 reference's answer on every family. (The automatic choice
runs one of the two; which one is tested in tests/test_pruned_knn.py.)"""
import importlib.util
import pathlib

import pytest
import torch

from fastgen.ops import knn
from fastgen.ops.reference import knn_exact

_spec = importlib.util.spec_from_file_location(
    "bench_knn_zoo", pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "bench_knn_zoo.py")
zoo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(zoo)


def small_cases():
    """One case of each family and patch layout (scikit-image's photos are a benchmark
    dependency only: sklearn's two stand in), shrunk to 600 x 2,500."""
    seen, out = set(), []
    for c in zoo.zoo():
        if c["kind"] == "patches" and not c["q_img"].endswith(".jpg"):
            continue
        key = (c["kind"], c.get("q_img"), c.get("k_img"), c.get("d"), c["k"])
        if key in seen:
            continue
        seen.add(key)
        out.append(dict(c, n=600, m=2500))
    return out


@pytest.mark.parametrize("case", small_cases(), ids=lambda c: c["id"].split("-n")[0] + f"-k{c['k']}")
def test_zoo_case_is_exact_on_both_paths(case):
    q, keys = zoo.make_case(case)
    k = case["k"]
    _, ref_i = knn_exact(q, keys, k)
    ref_i = ref_i.reshape(q.shape[0], k)
    sweep = knn(q, keys, k, prune=False)
    pruned = knn(q, keys, k, prune=True)
    assert torch.equal(sweep.idx, ref_i)
    assert torch.equal(pruned.idx, ref_i) and torch.equal(pruned.dist, sweep.dist)


def test_the_zoo_has_both_halves_and_every_family():
    cases = zoo.zoo()
    kinds = {c["kind"] for c in cases}
    assert kinds == {"patches", "gaussian", "mixture", "digits", "imle"}
    assert {c["half"] for c in cases} == {"tune", "held-out"}
    assert len({c["id"] for c in cases}) == len(cases)
