#!/usr/bin/env bash
# One prepared check of the CUDA paths, sized for a lent GPU (at most about 8 minutes on one H100):
#   1. the tests marked `cuda` (bf16/fp16 autocast vs fp32, compile == eager, padded vocabulary, activation
#      checkpointing, resume bit for bit, KV cache == recomputation, generate / eval / serve on the GPU);
#   2. `python main.py` as a user runs it on a GPU (the `gpu` preset on the embedded corpus);
#   3. bench/train_speed.py: GPT-2 124M, context 1024, bf16 + torch.compile, ours vs transformers.
# Each stage has its own time limit, so one that hangs does not take the others with it. Everything goes to
# OUT_DIR (default gpu_check_out/): the logs, the benchmark's JSON, and one summary, results.md.
#
#   bash bench/gpu_check.sh [OUT_DIR]
#
# Needs torch with CUDA and the packages of requirements.txt. Wheels in .whl/ (for a machine that cannot reach
# PyPI) are installed into a temporary folder first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-gpu_check_out}
mkdir -p "$OUT_DIR"
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_check_site \
        .whl/*.whl && export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
RESULTS=$OUT_DIR/results.md

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log to OUT_DIR/NAME.log, record the outcome
    local name=$1 limit=$2
    shift 2
    local started=$SECONDS
    timeout --signal=INT --kill-after=20 "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
    local rc=$?
    local outcome="passed"
    [ $rc -ne 0 ] && outcome="FAILED (exit $rc)"
    [ $rc -eq 124 ] && outcome="TIMED OUT after ${limit}s"
    echo "| $name | $outcome | $((SECONDS - started)) s |" >>"$RESULTS"
    echo "== $name: $outcome in $((SECONDS - started)) s"
    tail -n 25 "$OUT_DIR/$name.log"
}

{
    echo "# bench/gpu_check.sh, $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    echo '```'
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
    $PYTHON -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
    echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo '```'
    echo
    echo "| stage | outcome | time |"
    echo "|---|---|---|"
} >"$RESULTS" 2>&1
cat "$RESULTS"

stage tests 220 $PYTHON -m pytest -m cuda tests/test_speed_features.py -p no:cacheprovider -q -rA --durations=10
rm -rf /tmp/gpu_check_main
stage main_py 200 $PYTHON main.py --out /tmp/gpu_check_main
cp /tmp/gpu_check_main/metrics.jsonl "$OUT_DIR/main_py_metrics.jsonl" 2>/dev/null
stage train_speed 170 $PYTHON bench/train_speed.py --batch-size 16 --precision bf16 --compile on \
    --steps 5 --rounds 3 --warmup 3 --out "$OUT_DIR/train_speed.json"

{
    echo
    echo "## python main.py"
    echo '```'
    grep -E "device:|torch.compile|time budget|early stop|^done|val loss" "$OUT_DIR/main_py.log" | tail -n 25
    echo '```'
    echo
    echo "## bench/train_speed.py"
    echo '```'
    sed -n '/^precision/,$p' "$OUT_DIR/train_speed.log"
    echo '```'
} >>"$RESULTS"
echo
cat "$RESULTS"
