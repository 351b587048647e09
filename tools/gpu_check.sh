#!/usr/bin/env bash
# One prepared check of trtopt's GPU runtime on a fresh NVIDIA machine with CUDA and torch (a CUDA
# build), with or without TensorRT. Under 8 minutes: every part has its own time limit, and all of
# them share one budget (BUDGET_S, default 460 s); `make test-gpu` gets what the others leave.
#
#   tools/gpu_check.sh            # uses python3; PYTHON=/path/to/python tools/gpu_check.sh
#
# Parts (one summary line each, logs in $LOG_DIR):
#   environment   torch sees a CUDA device (nothing else runs without one)
#   install       trtopt (editable) + pytest + pycuda (built against this CUDA; needs nvcc)
#   contexts      per-thread execution contexts and pycuda buffers      } tests/test_gpu_cuda.py:
#   streams       stream ordering, the legacy default stream's side stream} real CUDA, TensorRT
#   cuda-graphs   capture, replay, recapture, concurrent first captures   } replaced by a double
#   allocator     data-dependent outputs through the output allocator     }
#   tensorrt      `make test-gpu` (real engines), only where `import tensorrt` works
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG_DIR=${LOG_DIR:-$(mktemp -d /tmp/trtopt-gpu-check.XXXX)}
BUDGET_S=${BUDGET_S:-460}  # the whole script, parts included: stays under 8 minutes
START=$(date +%s)
SUMMARY=()
FAILED=0

part() {  # part NAME LIMIT_S COMMAND...: run it within its limit and the budget left; one summary line
    local name=$1 limit=$2 left t0 status rc
    shift 2
    left=$(( START + BUDGET_S - $(date +%s) ))
    if [ "$left" -lt 10 ]; then
        SUMMARY+=("$(printf '%-12s %s' "$name" "FAIL (not run: the ${BUDGET_S}s budget is spent)")"); FAILED=1; return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    t0=$(date +%s)
    timeout "$limit" "$@" >"$LOG_DIR/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status="PASS: $(tail -n 1 "$LOG_DIR/$name.log" | cut -c1-100)"
           # pytest exits 0 when everything was skipped: on a machine with CUDA that is a failure here.
           if grep -q "skipped" "$LOG_DIR/$name.log" && ! grep -q "passed" "$LOG_DIR/$name.log" \
               && [ "$name" != install ] && [ "$name" != environment ]; then
               status="FAIL (all skipped: $(grep -m1 SKIPPED "$LOG_DIR/$name.log" | cut -c1-100))"; FAILED=1
           fi ;;
        124) status="FAIL (over ${limit}s)"; FAILED=1 ;;
        *) status="FAIL (exit $rc: $(grep -m1 -E 'FAILED|Error|error' "$LOG_DIR/$name.log" | cut -c1-100))"; FAILED=1 ;;
    esac
    SUMMARY+=("$(printf '%-12s %s, %ss' "$name" "$status" $(( $(date +%s) - t0 )))")
}

report() {
    echo "== trtopt GPU check: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -n1)"
    printf '%s\n' "${SUMMARY[@]}"
    echo "== total $(( $(date +%s) - START ))s; logs in $LOG_DIR"
}

part environment 30 "$PY" -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"
if [ "$FAILED" -ne 0 ]; then report; exit 1; fi

# pycuda must match the CUDA major version: before 2025.1.2 it does not compile against CUDA 13.
CUDA_MAJOR=$("$PY" -c "import torch; print((torch.version.cuda or '12').split('.')[0])")
PYCUDA="pycuda>=2024.1"
[ "$CUDA_MAJOR" -ge 13 ] && PYCUDA="pycuda>=2025.1.2"
part install 180 "$PY" -m pip install --quiet -e . pytest "$PYCUDA"
if [ "$FAILED" -ne 0 ]; then report; exit 1; fi

TESTS=(-m pytest -q -rs -p no:cacheprovider tests/test_gpu_cuda.py)
part contexts 45 "$PY" "${TESTS[@]}" -k "threads"
part streams 45 "$PY" "${TESTS[@]}" -k "streams or default_stream"
part cuda-graphs 45 "$PY" "${TESTS[@]}" -k "graph or captures"
part allocator 45 "$PY" "${TESTS[@]}" -k "allocator"

if "$PY" -c "import tensorrt" >/dev/null 2>&1; then
    # The Makefile's test-gpu target would create and fill its own venv first (minutes); point it at
    # this interpreter instead, whose packages the install part just set up.
    mkdir -p .gpu-check-venv && touch .gpu-check-venv/.installed
    part tensorrt 400 make test-gpu  # gets whatever the budget leaves VENV=.gpu-check-venv PY="$PY"
    rm -rf .gpu-check-venv
else
    SUMMARY+=("$(printf '%-12s %s' tensorrt 'SKIP (import tensorrt fails: install trtopt[gpu-cu12] or [gpu-cu13] to run make test-gpu)')")
fi

report
exit "$FAILED"
