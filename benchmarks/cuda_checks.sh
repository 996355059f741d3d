#!/usr/bin/env bash
# The GPU checks of one session, as one script: the device tests, the benchmark suite on CUDA and
# the quick ColorDigits demo (with concepts) on CUDA with its bounds. Each step has its own time
# limit and its log lands in OUT_DIR, so a step that breaks or overruns leaves the others' results.
#
#     bash benchmarks/cuda_checks.sh OUT_DIR [BENCH_SECONDS] [COMPARISON...]
#
# COMPARISON names (as run.py's --only) limit the benchmark step to those comparisons.
#
# Needs python3 with torch (CUDA), torchvision, captum and FrEIA; runs the package from this checkout.
set -u
out=${1:?usage: bash benchmarks/cuda_checks.sh OUT_DIR [BENCH_SECONDS] [COMPARISON...]}
bench_seconds=${2:-300}
shift $(( $# < 2 ? $# : 2 ))
mkdir -p "$out"
out=$(cd "$out" && pwd)  # absolute: the steps run from the repository root, wherever this was called from
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python3 -c "import torch, torchvision, captum; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'torchvision', torchvision.__version__, 'captum', captum.__version__, 'gpus', torch.cuda.device_count())"
    nproc
} > "$out/machine.txt" 2>&1

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to OUT_DIR/NAME.log
    local name=$1 seconds=$2
    shift 2
    local start=$SECONDS
    timeout "$seconds" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc after $((SECONDS - start)) s" | tee -a "$out/steps.txt"
    [ $rc -eq 0 ] || status=1
}

step device_tests 150 python3 -m pytest tests/test_device.py --device cuda -q -p no:cacheprovider
# fits on CUDA capture their steps as CUDA graphs (train_loop's cuda_graph); CAPTUM_INN_CUDA_GRAPHS=0
# in the caller's environment measures the eager step instead
step benchmarks "$bench_seconds" python3 benchmarks/run.py --device cuda --out "$out/results_cuda.json" ${1:+--only "$@"}
report=$(mktemp -d)
step demo_quick 160 python3 -m captum_inn demo --quick --concepts --device cuda --check --out "$report"
cp "$report/metrics.json" "$out/demo_metrics.json" 2>/dev/null
exit $status
