#!/usr/bin/env bash
# `kvreviver niah` on one GPU, then the same grid sharded over two GPUs with torchrun (issue 10): the wall clock of
# each, the speedup, and a row-by-row diff of the two results.jsonl (every field but the wall time `seconds`).
#
# Usage, from the repository root on a machine with 2 GPUs:
#   bash benchmarks/bench_niah_multigpu.sh [OUT_DIR]          (default runs/niah-multigpu)
# Environment: MODEL=folder (default: the embedded SmolLM2-135M-Instruct), METHODS, LENGTHS, DEPTHS, BUDGET, and
# DEVICE (default cuda; DEVICE=cpu with a tiny MODEL and a small grid checks the script itself without GPUs).
# The default grid, 4 lengths x 5 depths x 5 methods, is meant to take about 2 minutes on one H100; its 20 points
# split 10/10 over 2 ranks with equal token sums (tests/test_distributed.py checks that split).
# Both runs use 1 CPU thread per process (torchrun's default for its workers) and the same bf16 GPU model, after
# an untimed one-point warm-up of every method (model files in the page cache, kernels compiled and cached).
set -euo pipefail

OUT=${1:-runs/niah-multigpu}
PYTHON=${PYTHON:-python}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
export OMP_NUM_THREADS=1
export NCCL_NVLS_ENABLE=0            # the ranks only meet at gloo barriers, but keep NVLink multicast off anyway
export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo}   # one node: the barriers go over loopback

MODEL_ARGS=()
if [ -n "${MODEL:-}" ]; then MODEL_ARGS=(--model "$MODEL"); fi
METHODS=${METHODS:-full,kvreviver,h2o,streaming,snapkv}
SETUP=(--methods "$METHODS" --budget "${BUDGET:-0.25}" --max-new-tokens 32 --device "${DEVICE:-cuda}")
GRID=("${SETUP[@]}" --lengths "${LENGTHS:-1000,2000,3000,4000}" --depths "${DEPTHS:-0,0.25,0.5,0.75,1}")

rm -rf "$OUT/warmup" "$OUT/1gpu" "$OUT/2gpu"
mkdir -p "$OUT"
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'devices:',
    [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])" | tee "$OUT/summary.txt"
CUDA_VISIBLE_DEVICES=0 "$PYTHON" -m kvreviver_cli niah "${MODEL_ARGS[@]}" "${SETUP[@]}" --lengths 1000 --depths 0.5 \
    --out "$OUT/warmup" > /dev/null

start=$(date +%s.%N)
CUDA_VISIBLE_DEVICES=0 "$PYTHON" -m kvreviver_cli niah "${MODEL_ARGS[@]}" "${GRID[@]}" --out "$OUT/1gpu" \
    > "$OUT/1gpu.log" 2>&1
end=$(date +%s.%N)
one_gpu=$("$PYTHON" -c "print(f'{$end - $start:.1f}')")

start=$(date +%s.%N)
CUDA_VISIBLE_DEVICES=0,1 "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node 2 \
    -m kvreviver_cli niah "${MODEL_ARGS[@]}" "${GRID[@]}" --out "$OUT/2gpu" > "$OUT/2gpu.log" 2>&1
end=$(date +%s.%N)
two_gpus=$("$PYTHON" -c "print(f'{$end - $start:.1f}')")

cat "$OUT/2gpu.log"
"$PYTHON" - "$OUT/1gpu/results.jsonl" "$OUT/2gpu/results.jsonl" "$one_gpu" "$two_gpus" <<'EOF' \
    | tee -a "$OUT/summary.txt"
import json
import sys

one_path, two_path, one_s, two_s = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])


def rows(path):
    with open(path) as handle:
        found = [json.loads(line) for line in handle if line.strip()]
    bare = [{k: v for k, v in row.items() if k != "seconds"} for row in found]
    return sorted(bare, key=lambda row: json.dumps(row, sort_keys=True))


one, two = rows(one_path), rows(two_path)
different = sum(a != b for a, b in zip(one, two)) + abs(len(one) - len(two))
print(f"rows: 1 GPU {len(one)}, 2 GPUs {len(two)}; rows that differ (all fields but seconds): {different}")
print(f"wall clock: 1 GPU {one_s:.1f} s, 2 GPUs (torchrun) {two_s:.1f} s, speedup {one_s / two_s:.2f}x")
sys.exit(1 if different else 0)
EOF
