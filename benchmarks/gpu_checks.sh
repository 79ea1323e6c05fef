#!/bin/bash
# The GPU checks still waiting for a device, as one device call: bash benchmarks/gpu_checks.sh STAGE... from the
# repository root, with $OUT set (the device tool's output folder) and $TREE the tree to check (default: .; on the
# device tool, a `git archive HEAD` carried as devhead/, since the working tree travels as it is).
#   info        the GPU, driver, torch / triton / transformers versions
#   tests       the GPU tests of this tree (scored prefill, methods, decode kernel, graphs)
#   prefill_ab  benchmarks/candidates/README.md's prefill-base2 A/B: needs runs/ab from
#               `python benchmarks/ab_revisions.py prepare main exp/prefill-base2`, carried
#   tests_b2    the GPU tests on the prefill-base2 tree (this tree's tests, copied in)
#   padded      a padded batch's scored prefill: main (the fallback plan), 2 stages (prefill-fewer-stages.patch), 128x64
#   b1          issue 7's benchmark 1 (attention alone) at 128k, 32k and 8k, the linear combine
# Each stage writes under $OUT and prints its tail; a stage that fails does not stop the next.
set -u
: "${OUT:?set OUT to the folder the results go to}"
log() { echo "== $(date -u +%T) $*" | tee -a "$OUT/log.txt"; }
run_in() { (cd "$1" && shift && PYTHONPATH=$PWD "$@"); }
TREE=${TREE:-.}
AB=runs/ab
for stage in "$@"; do
  case $stage in
  info)
    { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
      python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
    } > "$OUT/device.txt" 2>&1; cat "$OUT/device.txt" ;;
  tests)
    log tests; run_in "$TREE" python3 -m pytest -q -m gpu tests/test_scored_prefill.py tests/test_gpu_methods.py \
      tests/test_kernel.py tests/test_graphs.py > "$OUT/tests.txt" 2>&1; tail -3 "$OUT/tests.txt" ;;
  prefill_ab)
    for tree in "$AB/main" "$AB/exp__prefill-base2"; do
      name=$(basename "$tree"); log prefill "$name"
      run_in "$tree" python3 benchmarks/bench_scored_prefill.py --backends triton,sdpa --kernels --tokens 8192,32768 \
        --out "$OUT/prefill_$name.jsonl" > "$OUT/prefill_$name.txt" 2>&1; tail -4 "$OUT/prefill_$name.txt"
    done ;;
  tests_b2)
    cp -r "$TREE/tests" "$TREE/pyproject.toml" "$AB/exp__prefill-base2/"; log tests_b2
    run_in "$AB/exp__prefill-base2" python3 -m pytest -q -m gpu tests/test_scored_prefill.py tests/test_gpu_methods.py \
      > "$OUT/tests_b2.txt" 2>&1; tail -3 "$OUT/tests_b2.txt" ;;
  padded)
    for knobs in "" kernels.scored_prefill.ROW_STAGES=2 kernels.scored_prefill.ROW_BLOCK_N=64; do
      log padded "${knobs:-main}"
      # shellcheck disable=SC2086  # no knob, or one
      run_in "$TREE" python3 benchmarks/with_knobs.py $knobs benchmarks/bench_scored_prefill.py --batch 2 --padded \
        --backends triton --kernels --tokens 8192,32768 --out "$OUT/padded.jsonl" >> "$OUT/padded.txt" 2>&1
      tail -2 "$OUT/padded.txt"
    done ;;
  b1)
    log b1; run_in "$TREE" python3 benchmarks/bench_decode_attention.py --combines mean --contexts 131072,32768,8192 \
      --sdpa-backends flash --out "$OUT/b1.jsonl" > "$OUT/b1.txt" 2>&1; tail -12 "$OUT/b1.txt" ;;
  *) echo "gpu_checks.sh: unknown stage $stage (info tests prefill_ab tests_b2 padded b1)" >&2; exit 2 ;;
  esac
done
log done
