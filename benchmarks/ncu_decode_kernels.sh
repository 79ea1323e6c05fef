#!/usr/bin/env bash
# Nsight Compute counters of one KVReviver decode step's kernels (issue 7): throughput against the HBM and L2
# ceilings, occupancy, launch resources and warp stalls, for the in-place step of profile_decode_kernels.py.
# Usage on a GPU machine, from the repository root: bash benchmarks/ncu_decode_kernels.sh CONTEXT REPORT_FILE
# The clocks are left alone (--clock-control none), as the device notes ask.
set -euo pipefail
context=${1:-32768}
report=${2:-runs/ncu_decode_kernels_${context}.txt}
mkdir -p "$(dirname "$report")"
report=$(realpath "$report")
cd benchmarks
# 3 warm-up steps and 1 counted one: the counted step's kernels are the last of each name.
ncu --clock-control none --print-summary none \
    -k 'regex:_decode_split|_position_pass|_bucket_logits|_bucket_values|_combine|_compress|_append' \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    --section MemoryWorkloadAnalysis \
    python3 profile_decode_kernels.py --contexts "$context" --combines mean --parts step --plain --calls 1 \
    --out /dev/null > "$report" 2>&1
