"""Every Triton kernel configuration the launchers can choose compiles for A100 (sm_80)
and H100/H200 (sm_90) without a GPU, with no register spills and shared memory within
the target's limit (fastgen/gpu_plan.py; `fastgen doctor --gpu-plan` prints the table)."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="triton is a test dependency (make test installs it)")


@pytest.fixture(scope="module")
def rows():
    # a fresh process without TRITON_INTERPRET: there the kernels are real @triton.jit functions
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = subprocess.run([sys.executable, "-c", "import json; from fastgen.gpu_plan import plan; print(json.dumps(plan()))"],
                         env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_every_kernel_and_config_is_in_the_plan(rows):
    names = {r["name"].split()[0] for r in rows}
    assert names == {"knn", "screen", "column_min", "weighted_argmin", "ball_count", "fold_patches", "reparameterize"}
    assert {r["arch"] for r in rows} == {80, 90}
    assert len(rows) >= 150


def test_compiles_for_both_targets_without_spills(rows):
    from fastgen.gpu_plan import LIMITS
    errors = [f"{r['name']} sm_{r['arch']}: {r['error']}" for r in rows if r["error"]]
    assert not errors, "\n".join(errors)
    spills = [f"{r['name']} sm_{r['arch']}: {r['spill_stores']} B stored / {r['spill_loads']} B loaded"
              for r in rows if r["spill_stores"] or r["spill_loads"]]
    assert not spills, "\n".join(spills)
    over = [f"{r['name']} sm_{r['arch']}: {r['shared']} B" for r in rows if r["shared"] > LIMITS[r["arch"]]["smem"]]
    assert not over, "\n".join(over)
    assert all(r["warps_per_sm"] >= 8 for r in rows), [r for r in rows if r["warps_per_sm"] < 8]
