#!/usr/bin/env bash
# The one prepared GPU check (issue 17): <= 8 minutes on one CUDA GPU. Writes OUT (default
# gpu-check/) with report.md, results.json and a full-size GPNN sample. Not run yet: no
# GPU has been lent to this project (README, "What has run where").
#   bash benchmarks/gpu_check.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu-check}
mkdir -p "$OUT"
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible')"
make install > "$OUT/install.log" 2>&1
pip install -q faiss-gpu-cu12 > "$OUT/faiss.log" 2>&1 || echo "faiss-gpu not installed (its column is skipped)"
timeout 120 python3 -m fastgen.cli doctor > "$OUT/doctor.txt" 2>&1 || true
# the kernels as compiled for this GPU: registers and spills next to the sm_80/sm_90 plan
timeout 200 python3 -m fastgen.cli doctor --gpu-plan > "$OUT/gpu-plan.md" 2>&1 || echo "gpu plan: see $OUT/gpu-plan.md"
timeout 300 python3 benchmarks/gpu_check.py "$OUT"
