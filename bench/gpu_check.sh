#!/usr/bin/env bash
# One prepared check of the CUDA paths, sized for a lent GPU (about 7 minutes on one H100 or H200, at most 10):
#   1. at once, side by side (what they check does not depend on speed):
#      - the tests marked `cuda` (bf16/fp16 autocast vs fp32, compile == eager, padded vocabulary, activation
#        checkpointing, resume bit for bit, KV cache == recomputation, CUDA-graph decoding, generate / eval / serve
#        on the GPU);
#      - `python main.py` as a user runs it on a GPU (the `gpu` preset on the embedded corpus: Muon + WSD over
#        1,000 steps, compiled), and the same with AdamW + cosine (the optimizer before, issue 16); with
#        STEPS=1, both recipes eagerly too, without the budget or early stop (the same 1,000 steps);
#   2. alone, timed: bench/generate_speed.py on the GPU, ours in fp32 and bf16, eager and replayed from CUDA graphs,
#      vs transformers fp32 (compiling the decoding step on CUDA took over 100 s in the first run: left out);
#   3. alone, timed: bench/train_speed.py, GPT-2 124M, context 1024, bf16 + torch.compile, ours vs transformers,
#      compiled in torch.compile's default mode and with CUDA graphs (reduce-overhead), each also timed without
#      the trainer's per-step host reads (--unsynced: how much of the step the GPU waits for the host);
#   4. alone, timed: bench/attention_speed.py (each SDPA backend on 124M's attention, and which one PyTorch picks)
#      and bench/profile_train_step.py (where our compiled step's GPU time goes, by kernel).
# Each stage has its own time limit, so one that hangs does not take the others with it. Everything goes to
# OUT_DIR (default gpu_check_out/): the logs, the benchmarks' JSON, and one summary, results.md.
#
#   bash bench/gpu_check.sh [OUT_DIR]
#
# Needs torch with CUDA and the packages of requirements.txt. Wheels in .whl/ (for a machine that cannot reach
# PyPI) are installed into a temporary folder first. The lent GPU machines of this project (an image with torch
# 2.11 and transformers, no PyPI) lack the `serve` extra's stack; fetch it beforehand where pip works:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 -d .whl fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 \
#       pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 uvicorn==0.54.0 \
#       annotated-doc==0.0.7 opentelemetry-api==1.45.2
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=$(mkdir -p "${1:-gpu_check_out}" && cd "${1:-gpu_check_out}" && pwd)
PYTHON=${PYTHON:-python3}
RUNS=${RUNS:-/tmp/gpu_check_runs}
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
    echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(nproc) CPU cores"
    echo '```'
    echo
    echo "| stage | outcome | time |"
    echo "|---|---|---|"
} >"$RESULTS" 2>&1
cat "$RESULTS"

# 1. Side by side. The runs share the embedded corpus, prepared once first (as `python main.py` would).
rm -rf "$RUNS" && mkdir -p "$RUNS"
stage tests 180 $PYTHON -m pytest -m cuda tests/test_speed_features.py -p no:cacheprovider -q -rA --durations=10 &
stage prepare 60 $PYTHON -m gpt2scratch prepare --tokenizer bpe:4096 --out data/shakespeare-bpe4096
ADAMW=(--optimizer adamw --schedule cosine)
FIXED=(--early-stop 0 --time-budget 0 --compile off --sample-every 0)
stage main_py 180 $PYTHON main.py --out "$RUNS/main_py" &
stage main_py_adamw 180 $PYTHON main.py --out "$RUNS/main_py_adamw" "${ADAMW[@]}" &
if [ "${STEPS:-0}" = 1 ]; then
    stage steps_muon 180 $PYTHON main.py --out "$RUNS/steps_muon" "${FIXED[@]}" &
    stage steps_adamw 180 $PYTHON main.py --out "$RUNS/steps_adamw" "${FIXED[@]}" "${ADAMW[@]}" &
fi
wait
for run in main_py main_py_adamw steps_muon steps_adamw; do
    cp "$RUNS/$run/metrics.jsonl" "$OUT_DIR/$run.metrics.jsonl" 2>/dev/null
done

# 2., 3. and 4. Alone, for timings: decoding first (CUDA graphs, issue 15), then training speed and where it goes.
stage generate_speed 100 $PYTHON bench/generate_speed.py --device cuda --dtypes fp32 bf16 fp32+graphs bf16+graphs \
    --batches 1 8 --rounds 3
stage train_speed 200 $PYTHON bench/train_speed.py --batch-size 16 --precision bf16 --compile on \
    --compile-mode default reduce-overhead --unsynced --steps 5 --rounds 3 --warmup 3 --out "$OUT_DIR/train_speed.json"
stage attention_speed 45 $PYTHON bench/attention_speed.py --batch-size 16 --dtype bf16
stage profile 100 $PYTHON bench/profile_train_step.py --batch-size 16 \
    --precision bf16 --compile on --steps 3 --rows 40

{
    echo
    echo "## Training runs on the embedded corpus (gpu preset)"
    echo '```'
    $PYTHON - "$OUT_DIR" <<'EOF'
import json, statistics, sys
from pathlib import Path

print(f"{'run':<14}{'steps':>7}{'min':>6}{'best val':>9}{'at step':>8}{'last val':>9}{'val bpb':>8}{'tok/s':>10}{'MFU':>7}")
for run in ("main_py", "main_py_adamw", "steps_muon", "steps_adamw"):
    path = Path(sys.argv[1]) / f"{run}.metrics.jsonl"
    if not path.is_file():
        continue
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train = [r for r in rows if "train_loss" in r]
    val = [r for r in rows if "val_loss" in r]
    best = min(val, key=lambda r: r["val_loss"]) if val else {}
    rate = statistics.median(r["tokens_per_sec"] for r in train) if train else 0
    mfus = [r["mfu"] for r in train if r.get("mfu") is not None]
    print(
        f"{run:<14}{train[-1]['step'] if train else 0:>7}{sum(r['dt_ms'] for r in train) / 60e3:>6.1f}"
        f"{best.get('val_loss', float('nan')):>9.4f}{best.get('step', 0):>8}"
        f"{val[-1]['val_loss'] if val else float('nan'):>9.4f}{val[-1].get('val_bpb', float('nan')) if val else float('nan'):>8.4f}"
        f"{rate:>10,.0f}{f'{statistics.median(mfus):.1%}' if mfus else '-':>7}"
    )
    print("    val loss by step: " + " ".join(f"{r['step']}:{r['val_loss']:.3f}" for r in val))
EOF
    echo '```'
    echo
    echo "## python main.py"
    echo '```'
    grep -E "device:|torch.compile|time budget|early stop|^done" "$OUT_DIR/main_py.log" | tail -n 12
    echo '```'
    echo
    echo "## bench/train_speed.py"
    echo '```'
    sed -n '/^precision/,$p' "$OUT_DIR/train_speed.log"
    echo '```'
    echo
    echo "## bench/attention_speed.py"
    echo '```'
    sed -n '/^causal attention/,$p' "$OUT_DIR/attention_speed.log" | grep -v "USDT\|Warning\|warn"
    echo '```'
    echo
    echo "## bench/profile_train_step.py (our compiled step, by GPU kernel)"
    echo '```'
    sed -n '/ms\/step$/,$p' "$OUT_DIR/profile.log" | grep -v "USDT" | cut -c1-200 | head -n 50
    echo '```'
    echo
    echo "## bench/generate_speed.py"
    echo '```'
    grep -vE "^\s*$|Warning|warn" "$OUT_DIR/generate_speed.log" | tail -n 12
    echo '```'
} >>"$RESULTS" 2>&1
echo
cat "$RESULTS"
