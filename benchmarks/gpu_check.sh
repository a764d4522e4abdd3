#!/usr/bin/env bash
# The one prepared GPU check (issue 17): <= 8 minutes on one CUDA GPU. Writes OUT (default
# gpu-check/) with report.md, results.json, the test log and a full-size GPNN sample. Not
# run yet: no GPU has been lent to this project (README, "What has run where").
# Works offline (the lent GPU machines reach no index): it builds the C++ extension in
# place against the machine's own (CUDA) torch instead of `make install`; faiss-gpu is
# tried and skipped when it cannot be installed.
#   bash benchmarks/gpu_check.sh [OUT]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu-check}
mkdir -p "$OUT"
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible')" || exit 2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
# 1. the extension against a CUDA build of torch (the CPU ops register; CUDA tensors go to Triton)
if timeout 240 python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then echo "build: ok" > "$OUT/build.txt";
else echo "build: FAILED (see build.log); the checks below run on the torch/triton backends" > "$OUT/build.txt"; fi
timeout 60 python3 -m pip install -q faiss-gpu-cu12 > "$OUT/faiss.log" 2>&1 || echo "faiss-gpu not installed (its column is skipped)"
timeout 120 python3 -m fastgen.cli doctor > "$OUT/doctor.txt" 2>&1
# 2. the suite's cuda parametrisation: every op on CUDA tensors against the float64 reference
timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py > "$OUT/test_cuda.txt" 2>&1
echo "tests/test_cuda.py exit $?" >> "$OUT/test_cuda.txt"
# 3. timings and one full-size GPNN sample, into report.md (which quotes 1 and 2)
timeout 240 python3 benchmarks/gpu_check.py "$OUT"
