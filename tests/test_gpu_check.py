"""The prepared GPU check (benchmarks/gpu_check.sh + gpu_check.py) must not rot while no
GPU is lent: its Python part runs here on the CPU backends (GPU_CHECK_DEVICE=cpu, small
sizes), and the shell script refuses a machine without a CUDA GPU with exit 2."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_python_part_runs_and_reports(tmp_path):
    env = {**os.environ, "GPU_CHECK_DEVICE": "cpu"}
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = (tmp_path / "report.md").read_text()
    assert "## Correctness on CUDA tensors" in report and "## Speed on the GPU" in report
    assert "FAIL" not in report and report.count("| ok |") >= 10
    assert (tmp_path / "results.json").exists() and (tmp_path / "gpnn_china_full.png").exists()


def test_shell_script_refuses_a_machine_without_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: there the script is the real check")
    out = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), str(tmp_path / "gc")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "no CUDA GPU visible" in out.stderr
