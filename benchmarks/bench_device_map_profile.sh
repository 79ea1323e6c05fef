#!/usr/bin/env bash
# Issue 10, "big models": `kvreviver profile` on the Llama-2-7B architecture (random weights) with its layers spread
# over 2 GPUs by `--device-map auto`, memory read through NVML on each GPU; then the same setup on one GPU of the
# same machine, side by side.
#
# Run on a 2-GPU machine (device kind nvidia-h100-x2), from the repository root:
#   bash benchmarks/bench_device_map_profile.sh [RESULTS_DIR]        # default: $OUT/device_map, else results/device_map
# Writes RESULTS_DIR/{2gpu,1gpu}/profile.json (per-GPU NVML and torch peaks in each row) and RESULTS_DIR/*.log.
# Both runs together take about 1-2 minutes on 2 H100s (model build on the GPUs included).
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:-${OUT:-results}/device_map}
PYTHON=${PYTHON:-python3}
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
SETUP=(--arch llama-2-7b --random-weights --methods full,kvreviver --budget 0.1 --batch 1,8 --context 2048
       --new-tokens 64)
mkdir -p "$RESULTS"

gpus=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
if [ "$gpus" -lt 2 ]; then
    echo "error: this benchmark needs 2 GPUs, found $gpus" >&2
    exit 2
fi
nvidia-smi --query-gpu=index,name,memory.total --format=csv | tee "$RESULTS/gpus.log"

# The model's layers over 2 GPUs (16 + 16 decoder layers for Llama-2-7B), NVML read on each.
CUDA_VISIBLE_DEVICES=0,1 "$PYTHON" -m kvreviver_cli profile "${SETUP[@]}" --device-map auto \
    --out "$RESULTS/2gpu" 2>&1 | tee "$RESULTS/2gpu.log"

# The same setup on one GPU (what the 2-GPU figures are compared with).
CUDA_VISIBLE_DEVICES=0 "$PYTHON" -m kvreviver_cli profile "${SETUP[@]}" \
    --out "$RESULTS/1gpu" 2>&1 | tee "$RESULTS/1gpu.log"
