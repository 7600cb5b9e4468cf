#!/usr/bin/env bash
# The GPU check, in one run on a CUDA machine (issue 17): install what it needs from this repository,
# run the CUDA tests (`pytest -m gpu`: Triton kernels in fp32/fp16/bf16 against float64 references
# and their batch invariance, the engine on CUDA against transformers/PEFT on CUDA), then
# benchmarks/kernels.py and benchmarks/gpu_throughput.py, printing every table. Sized to finish in
# under 8 minutes on one H100/H200-class GPU: each stage has a time cap, and the throughput run gets
# what is left of the budget. Everything printed also goes to the log file named on the first and last
# lines: $GPU_CHECK_LOG, else $OUT/gpu_check.log when OUT is set, else ./gpu_check.log.
#
#   bash scripts/gpu_check.sh
#
# Without CUDA it stops at once with exit status 2. Installing: the machine keeps its own CUDA build
# of torch (constraints.txt pins the CPU build this project's CI uses; here the pin is replaced by the
# installed version). Wheels in .whl/ are installed with --no-index; with no package index reachable,
# the package alone goes in (--no-deps) and the check runs on what the machine has: it needs only
# torch, triton, transformers, tokenizers, peft and pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUDGET_S=${GPU_CHECK_BUDGET_S:-465}
LOG=${GPU_CHECK_LOG:-${OUT:-.}/gpu_check.log}
mkdir -p "$(dirname "$LOG")"
exec > >(tee "$LOG") 2>&1
STARTED=$(date +%s)
echo "gpu_check: $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown); log: $LOG"

finish() {  # status line for every stage, then the log's name again
  echo
  echo "=== gpu_check summary ($(( $(date +%s) - STARTED ))s)"
  for line in "${SUMMARY[@]}"; do echo "  $line"; done
  echo "gpu_check: log written to $LOG"
  sleep 0.2  # let tee drain
  exit "$1"
}
SUMMARY=()

# 1. A CUDA device, or stop now.
if ! "$PY" - <<'EOF'
import sys
try:
    import torch
except ImportError as error:
    sys.exit(f"gpu_check: FAILED: torch does not import ({error}); this check needs a CUDA build of torch")
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: FAILED: no CUDA device visible to torch {torch.__version__} "
             f"(CUDA build: {torch.version.cuda or 'none'}); run this on a machine with an NVIDIA GPU")
props = torch.cuda.get_device_properties(0)
print(f"gpu_check: torch {torch.__version__} (CUDA {torch.version.cuda}), {torch.cuda.device_count()} GPU(s); "
      f"GPU 0: {props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs, "
      f"compute capability {props.major}.{props.minor}")
EOF
then
  SUMMARY+=("cuda: none, nothing run")
  finish 2
fi

# 2. Install from the repository, keeping the machine's CUDA torch.
TORCH_VERSION=$("$PY" -c 'import torch; print(torch.__version__)')
CONSTRAINTS=$(mktemp)
grep -v '^torch==' constraints.txt >"$CONSTRAINTS"
echo "torch==$TORCH_VERSION" >>"$CONSTRAINTS"
if [ -d .whl ]; then
  SOURCE=(--no-index --find-links .whl)
else
  SOURCE=(--retries 0 --timeout 15)
fi
if "$PY" -m pip install -q --disable-pip-version-check "${SOURCE[@]}" -c "$CONSTRAINTS" -e ".[dev]"; then
  SUMMARY+=("install: lorax-mlflow[dev] with torch $TORCH_VERSION kept")
else
  echo "gpu_check: the dev dependencies could not be installed (no package index?); installing lorax-mlflow alone"
  "$PY" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . \
    || echo "gpu_check: editable install failed too; running from the checkout"
  SUMMARY+=("install: lorax-mlflow --no-deps, with the machine's packages (torch $TORCH_VERSION)")
fi
rm -f "$CONSTRAINTS"
if ! "$PY" -c "import torch, triton, transformers, tokenizers, peft, pytest, lorax_kernels, tests.engine_support"; then
  echo "gpu_check: FAILED: a package the check needs is missing (above); carry its wheel in .whl/"
  SUMMARY+=("imports: failed")
  finish 3
fi
"$PY" -c "import torch, triton, transformers, peft; print(f'gpu_check: triton {triton.__version__}, transformers {transformers.__version__}, peft {peft.__version__}')"

# 3. The stages, each under a time cap; the last one gets what is left of the budget.
export PYTHONUNBUFFERED=1
FAILED=0
stage() {  # stage NAME CAP_S COMMAND...
  local name=$1 cap=$2 began rc left
  shift 2
  left=$(( BUDGET_S - ($(date +%s) - STARTED) ))
  [ "$cap" -gt "$left" ] && cap=$left
  if [ "$cap" -lt 30 ]; then
    SUMMARY+=("$name: skipped, ${left}s of the budget left")
    FAILED=1
    return
  fi
  echo
  echo "=== $name (cap ${cap}s): $*"
  began=$(date +%s)
  timeout --signal=INT --kill-after=20 "$cap" "$@"
  rc=$?
  [ "$rc" -ne 0 ] && FAILED=1
  [ "$rc" -eq 124 ] && rc="$rc (time cap reached)"
  SUMMARY+=("$name: exit $rc after $(( $(date +%s) - began ))s")
}

GPU_TEST_FILES=$(grep -l "pytest.mark.gpu" tests/test_*.py | tr '\n' ' ')
# shellcheck disable=SC2086
stage "pytest -m gpu" 170 "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider $GPU_TEST_FILES
stage "benchmarks/kernels.py" 100 "$PY" -m benchmarks.kernels
stage "benchmarks/gpu_throughput.py" 600 "$PY" -m benchmarks.gpu_throughput --requests 64 --prompt-tokens 128 \
  --max-tokens 64 --adapters 32
finish "$FAILED"
