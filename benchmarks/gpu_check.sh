#!/usr/bin/env bash
# GPU check of the Triton kernels, in one go (< 6 minutes on an H100 / H200): the benchmark first, then the
# compiled kernel tests.
#
#   bash benchmarks/gpu_check.sh               # on a CUDA machine; report in benchmarks/out/ (or $OUT)
#   bash benchmarks/gpu_check.sh --dry-run     # on any machine: proves the script is well formed (below)
#   PYTHON=/path/to/python bash benchmarks/gpu_check.sh   # default: .venv/bin/python if there, else python3
#
# Needs torch (CUDA), triton, numpy and pytest -- not vLLM, not scipy, nothing installed, no network: this
# package is imported from the checkout (PYTHONPATH). pytest runs with -n 8 when pytest-xdist is there,
# plainly otherwise.
#
#   1. gpu_bench.py: copy bandwidth, decode vs a bf16 paged kernel and SDPA (target point first), store,
#      impl forward, prefill, registers / spills, a BLOCK_N / warps / stages / lookup sweep (budget 120 s,
#      killed at 150 s);
#   2. pytest tests/kernels (the Triton kernels' tests), compiled (TRITON_INTERPRET=0; killed at 180 s).
#
# --dry-run runs the same steps on the CPU under the Triton interpreter (TRITON_INTERPRET=1) with tiny
# shapes, inside benchmarks/bare.py (vLLM, scipy, safetensors, ... unimportable, as on the GPU box):
# gpu_bench.py --dry-run, the kernel tests' collection, one test of each file, and (when Triton's NVIDIA
# backend is installed) kernel_report.py: the kernels compiled for sm_90 on the CPU, registers and spills.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"  # Triton 3.9 warns unless it is set
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
DRY=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $arg (accepted: --dry-run)" >&2; exit 2 ;;
    esac
done
REPORT_DIR="${OUT:-benchmarks/out}"
mkdir -p "$REPORT_DIR"
REPORT="$REPORT_DIR/gpu_check.txt"
: > "$REPORT"
log() { echo "$@" | tee -a "$REPORT"; }
run() {  # run [timeout seconds] command...: output to the report; remembers a failure
    local limit=$1; shift
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$REPORT"
    local rc=${PIPESTATUS[0]}
    log "   ($(( SECONDS - t0 )) s, exit $rc)"
    [ "$rc" -eq 0 ] || status=1
}
status=0
start=$SECONDS
# the Triton kernels' tests (tests/kernels also holds the compiled CPU ops' tests: not this check's business)
TESTS=(tests/kernels --ignore=tests/kernels/test_cpu_ops.py)

log "== gpu_check $( [ $DRY -eq 1 ] && echo '--dry-run ' )$(date -u +%FT%TZ)"
if ! "$PY" -c "import torch, triton, numpy; print('$PY: torch', torch.__version__, '| triton', triton.__version__, '| numpy', numpy.__version__, '| cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')" 2>&1 | tee -a "$REPORT"; then
    log "== $PY cannot import torch, triton and numpy (set PYTHON=...)"; exit 2
fi
if ! "$PY" -c "import pytest" 2>/dev/null; then
    log "== pytest is not installed: the tests cannot run"; status=1
fi
if "$PY" -c "import xdist" 2>/dev/null; then PARALLEL=(-n 8); else PARALLEL=(); log "(pytest-xdist absent: tests run in one process)"; fi

if [ $DRY -eq 1 ]; then
    export TRITON_INTERPRET=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
    BARE=("$PY" benchmarks/bare.py)
    log "== 1. gpu_bench.py --dry-run (interpreter, tiny shapes, bare environment)"
    run 300 "${BARE[@]}" benchmarks/gpu_bench.py --dry-run --json "$REPORT_DIR/gpu_bench.json"
    log "== 2. kernel tests: collection, then one test of each file (interpreter, bare environment)"
    run 120 "${BARE[@]}" -m pytest --collect-only -qq -p no:cacheprovider "${TESTS[@]}"
    run 300 "${BARE[@]}" -m pytest -q -p no:cacheprovider -rfE \
        "tests/kernels/test_fields.py::test_word_widths_follow_layout_and_alignment" \
        "tests/kernels/test_kernels.py::test_decode_compiles_once_for_every_batch_size" \
        "tests/kernels/test_kernels_protected.py::test_zero_sink_and_window_is_bit_identical"
    if "$PY" -c "import triton.backends.nvidia.compiler" 2>/dev/null; then
        log "== 3. kernel_report.py: the kernels compiled for sm_90 on this CPU (registers, spills)"
        TRITON_INTERPRET=0 run 300 "$PY" benchmarks/kernel_report.py
    fi
else
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        log "== no CUDA device: use --dry-run"; exit 2
    fi
    export TRITON_INTERPRET=0  # the tests default to the interpreter without a GPU; compile here
    log "== 1. gpu_bench.py (first calls, i.e. compiles, are timed apart)"
    run 150 "$PY" benchmarks/gpu_bench.py --budget 120 --json "$REPORT_DIR/gpu_bench.json"
    log "== 2. pytest ${TESTS[*]} (compiled) ${PARALLEL[*]:-}"
    run 180 "$PY" -m pytest "${TESTS[@]}" "${PARALLEL[@]}" -q -rfE -p no:cacheprovider --durations=5
fi

log "== gpu_check done in $(( SECONDS - start )) s, status $status (report: $REPORT)"
exit $status
