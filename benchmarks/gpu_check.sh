#!/usr/bin/env bash
# One device check for a machine with a CUDA GPU, at most 8 minutes, ending in one table:
#   1. the GPU tests: the kernel tests of tests/test_pairwise.py, test_aibn.py and test_cluster.py
#      on CUDA tensors, and every test marked gpu;
#   2. each GPU kernel at MSMT17 scale timed against its static H100 estimate
#      (benchmarks/gpu_check.py);
#   3. a 2-round training run on the synthetic camera network with --device cuda.
#
#   bash benchmarks/gpu_check.sh            # from anywhere; the extension built with
#                                           # IICS_WITH_CUDA=1 pip install -e .
#   bash benchmarks/gpu_check.sh --dry-run  # no GPU needed: CPU fallbacks at small sizes, only the
#                                           # gpu-marked tests (skipped); checks the script itself
# Exit status 0 when every step passed. Logs stay in the folder printed at the end.
set -uo pipefail

USAGE="usage: bash benchmarks/gpu_check.sh [--dry-run | -h | --help]"
DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  -h|--help)  # the usage line, then this file's opening comment
    echo "$USAGE"
    awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}"
    exit 0 ;;
  "") ;;
  *) echo "$USAGE" >&2; exit 2 ;;
esac

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
PYTHON=${PYTHON:-python}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/iics_gpu_check.XXXXXX") || exit 2
: > "$WORK/steps.tsv"

if [[ $DRY -eq 0 ]]; then
  if ! "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    echo "no CUDA device visible to torch; run with --dry-run to check the script without one" >&2
    exit 2
  fi
  if ! "$PYTHON" -c 'import sys; from iics_fast.cluster import has_cuda_merge; sys.exit(not has_cuda_merge())'; then
    echo "iics_fast._C was built without CUDA: rebuild with IICS_WITH_CUDA=1 pip install -e ." >&2
    exit 2
  fi
fi

# step NAME BUDGET_SECONDS COMMAND...: runs COMMAND under `timeout`, output to $WORK/NAME.log,
# and records (name, exit status, seconds, budget) in steps.tsv.
step() {
  local name=$1 budget=$2 start rc
  shift 2
  echo "== $name (budget ${budget}s)"
  start=$(date +%s)
  timeout "$budget" "$@" > "$WORK/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - start ))" "$budget" >> "$WORK/steps.tsv"
  tail -n 3 "$WORK/$name.log"
}

if [[ $DRY -eq 1 ]]; then
  export TRITON_INTERPRET=1
  step gpu_tests 120 "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu \
    tests/test_cluster.py tests/test_pairwise.py tests/test_aibn.py
  step kernels 300 "$PYTHON" -m benchmarks.gpu_check --dry-run --repeats 1 --json "$WORK/kernels.json"
  step train 300 "$PYTHON" -m iics_fast.train --device cpu --rounds 2 --out "$WORK/train" \
    --dataset synthetic --dataset-options \
    '{"num_ids": 8, "num_test_ids": 4, "num_cameras": 2, "images_per_camera": [2, 3], "num_distractors": 4, "seed": 3, "image_format": "png"}' \
    --arch resnet18 --height 32 --width 16 --eval-every 1 --k-intra 6 --k-inter 8 \
    --batch-per-camera 4 --batch-p 4 --batch-k 2 --epochs-intra 1 --epochs-inter 1 \
    --threads 1 --no-progress --no-verbose --pretrained none
else
  step gpu_tests 210 "$PYTHON" -m pytest -q -p no:cacheprovider -m "not slow or gpu" \
    tests/test_cluster.py tests/test_pairwise.py tests/test_aibn.py
  step kernels 180 "$PYTHON" -m benchmarks.gpu_check --json "$WORK/kernels.json"
  step train 90 "$PYTHON" -m iics_fast.train --device cuda --rounds 2 --out "$WORK/train" \
    --eval-every 1 --no-progress --no-verbose
fi

echo
"$PYTHON" -m benchmarks.gpu_check --summary "$WORK"
rc=$?
echo "logs: $WORK"
exit "$rc"
