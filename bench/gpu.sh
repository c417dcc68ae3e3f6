#!/usr/bin/env bash
# Take the GPU figures on one GPU: the `cuda` tests (pytest -m cuda), then every benchmark on CUDA
# (bench/run_all.py --device cuda), which writes the GPU sections of bench/RESULTS.md
# ("## <benchmark>, GPU: <name>"). Sized for <= 8 minutes (bench/README.md, "On a GPU"). Exits 2 when no GPU is
# visible, 1 when a test or a benchmark failed (the benchmarks run after a failed test too, so one session
# yields every figure).
#
#   bench/gpu.sh [run_all.py options, e.g. --no-write or --only retrieval train_step]
#
# The benchmarks use the first visible GPU; the two-process DDP test needs two (CUDA_VISIBLE_DEVICES=0,1) and
# skips with its reason otherwise. PYTHON overrides the interpreter (default: the repository's .venv).
set -euo pipefail

cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
probe='import sys, torch
if not torch.cuda.is_available():
    sys.exit(3)
print(f"{torch.cuda.get_device_name(0)}, {torch.cuda.device_count()} GPU(s) visible")'
found=0
gpu=$("$python" -c "$probe" 2>/dev/null) || found=$?
if [ "$found" -eq 3 ]; then
  echo "bench/gpu.sh: no CUDA GPU visible (torch.cuda.is_available() is false); nothing was run" >&2
  exit 2
elif [ "$found" -ne 0 ]; then
  echo "bench/gpu.sh: $python cannot import torch (exit $found); set PYTHON to the project's interpreter" >&2
  exit 2
fi

export HF_HUB_OFFLINE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
budget=480
start=$SECONDS
echo "bench/gpu.sh: $gpu; budget $budget s"

status=0
"$python" -m pytest -q -m cuda -rs test || status=1
tests=$((SECONDS - start))
"$python" bench/run_all.py --device cuda "$@" || status=1

total=$((SECONDS - start))
verdict="within the budget"
[ "$total" -le "$budget" ] || verdict="OVER the $budget s budget"
echo "bench/gpu.sh: cuda tests $tests s, benchmarks $((total - tests)) s, $total s in all ($verdict)"
exit "$status"
