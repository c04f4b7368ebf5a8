#!/usr/bin/env bash
# GPU check for the Triton kernels: compiled tests + decode and store benchmarks, < 6 minutes.
#
#   bash benchmarks/gpu_check.sh            # report in benchmarks/out/ (or $OUT when set)
#   PYTHON=/path/to/python bash benchmarks/gpu_check.sh
#
# Needs torch (CUDA), triton, scipy, safetensors and pytest -- not vLLM, and no network:
# this package is imported from the checkout (PYTHONPATH), never pip-installed.
# The decode and store benchmarks use vLLM's cache layout ([blocks, H, block_size, slot]
# permuted), what serving passes; tests cover it and the contiguous layout.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
REPORT_DIR="${OUT:-benchmarks/out}"
mkdir -p "$REPORT_DIR"
REPORT="$REPORT_DIR/gpu_check.txt"
: > "$REPORT"
log() { echo "$@" | tee -a "$REPORT"; }

export TRITON_INTERPRET=0   # the test module defaults to the interpreter; compile here
log "== gpu_check $(date -u +%FT%TZ)"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')" 2>&1 | tee -a "$REPORT"
status=0
if ! "$PY" -c "import vllm_turboquant.kernels.ops" 2>&1 | tee -a "$REPORT"; then
    log "== cannot import vllm_turboquant.kernels.ops from $PWD (is vllm_turboquant/kernels -> ../kernels a symlink?)"
    exit 1
fi

log "== tests/test_kernels.py tests/test_kernels_protected.py (compiled)"
if "$PY" -c "import pytest" 2>/dev/null; then
    timeout 220 "$PY" -m pytest tests/test_kernels.py tests/test_kernels_protected.py -q -rfE -p no:cacheprovider --durations=5 2>&1 | tee -a "$REPORT"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
else
    log "pytest is not installed: tests skipped"; status=1
fi

log "== decode_bench --quick"
timeout 120 "$PY" benchmarks/decode_bench.py --quick --json "$REPORT_DIR/decode_bench.json" 2>&1 | tee -a "$REPORT"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

log "== store_bench"
timeout 40 "$PY" benchmarks/store_bench.py --tokens 16,4096,32768 --presets turboquant3,turboquant3_qjl 2>&1 | tee -a "$REPORT"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

log "== gpu_check done, status $status (report: $REPORT)"
exit $status
