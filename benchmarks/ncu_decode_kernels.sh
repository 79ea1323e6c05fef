#!/usr/bin/env bash
# Nsight Compute counters of one KVReviver decode step's kernels (issue 7): throughput against the HBM and L2
# ceilings, occupancy, launch resources and warp stalls, for the in-place step of profile_decode_kernels.py.
# Usage on a GPU machine, from the repository root: bash benchmarks/ncu_decode_kernels.sh CONTEXT REPORT_FILE [KERNELS]
# KERNELS: a regex of kernel names. With SOURCE=1 it also writes REPORT_FILE.source.csv: the warp stall samples of
# the last profiled kernel per source line (Triton's line info points at the Python lines).
# The clocks are left alone (--clock-control none), as the device notes ask.
set -euo pipefail
context=${1:-32768}
report=${2:-runs/ncu_decode_kernels_${context}.txt}
kernels=${3:-_decode_split|_vague_logits|_position_pass|_bucket_values|_combine|_compress|_append}
mkdir -p "$(dirname "$report")"
report=$(realpath "$report")
cd benchmarks
step=(python3 profile_decode_kernels.py --contexts "$context" --combines mean --parts step --plain --calls 1
      --out /dev/null)
# 3 warm-up steps and 1 counted one: the counted step's kernels are the last of each name.
ncu --clock-control none --print-summary none -k "regex:$kernels" \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    --section MemoryWorkloadAnalysis "${step[@]}" > "$report" 2>&1
if [[ "${SOURCE:-0}" == 1 ]]; then
    ncu --clock-control none -k "regex:$kernels" --launch-skip 3 --launch-count 1 --import-source yes \
        --section SourceCounters --section WarpStateStats -f -o "$report.rep" "${step[@]}" >> "$report" 2>&1
    ncu -i "$report.rep.ncu-rep" --page source --csv --print-source cuda > "$report.source.csv" 2>&1 || true
fi
