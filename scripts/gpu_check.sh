#!/usr/bin/env bash
# The GPU paths of issue 14, run for real on one CUDA GPU (an H200 when this project is lent one), in <= 10 minutes.
#
#   bash scripts/gpu_prepare.sh                    # HERE, once: .gpu/ = the packages the GPU image lacks + the JSB data
#   bash scripts/gpu_check.sh [OUT_DIR]            # THERE (the device tool: carry [".gpu"], OUT_DIR=$OUT)
#
# Steps, each under its own time limit so that one failure or overrun leaves the others' results:
#   1. decode benchmark, 124M and 350M, batch 1 and 64, prompt 16 and 512, bf16: armodal eager / FastDecoder
#      (CUDA graphs) / FastDecoder + int8 weights vs HF generate (P1) and HF static cache + compile (P2);
#   2. training MFU benchmark, 124M, seq 1024, bf16 autocast, fused AdamW, eager and compiled vs HF;
#   3. a real `armodal-train experiment=music_jsb trainer=gpu model=small` for ~2 minutes;
#   4. `armodal-generate compile=true` on that checkpoint.
# Writes OUT_DIR/*.json, one log per step and status.txt (step, exit code, seconds).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-docs/gpu}}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
if [ -d .gpu/site ]; then  # packages carried from this machine (scripts/gpu_prepare.sh)
    export PYTHONPATH="$PYTHONPATH:$PWD/.gpu/site"
    [ -n "$(ls .gpu/whl/*.whl 2>/dev/null)" ] && python3 -m pip install -q --no-index --no-deps --no-compile \
        --no-cache-dir --target /tmp/gpu_site .gpu/whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/gpu_site"
fi
[ -d .gpu/data ] && export ARMODAL_SHARED_DATA="$PWD/.gpu/data"
export ARMODAL_RUNS=/tmp/gpu_runs
PY=${PY:-python3}
: > "$OUT/status.txt"

step() {  # step NAME SECONDS CMD...: run with a time limit, log, record the exit code
    local name=$1 limit=$2 t0=$SECONDS
    shift 2
    echo "== $name (limit ${limit}s): $*"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc ${limit}s-limit $((SECONDS - t0))s" | tee -a "$OUT/status.txt"
    tail -n 5 "$OUT/$name.log"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(), 'transformers', transformers.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

for size in base medium; do
    step "decode_$size" 130 $PY scripts/bench_generate.py --device cuda --dtype bf16 --sizes "$size" \
        --batch 1,64 --prompt 16,512 --new 128 --repeats 3 --contenders ours,ours_fast,ours_fast_int8,p1,p2 \
        --out "$OUT/bench_generate_${size}_gpu.json"
done
step train_mfu 80 $PY scripts/bench_train.py --device cuda --size base --seq 1024 --batch 16 --dtype bf16 \
    --steps 10 --warmup 3 --repeats 2 --contenders ours,ours_compiled,hf,hf_compiled --out "$OUT/bench_train_base_gpu.json"
step train_jsb 170 $PY -m armodal.train experiment=music_jsb trainer=gpu model=small name=gpu_jsb \
    run_dir=/tmp/gpu_runs/gpu_jsb trainer.max_time=00:00:02:00 trainer.val_check_interval=100 \
    callbacks.samples.enabled=false
cp /tmp/gpu_runs/gpu_jsb/metrics.json "$OUT/train_jsb_metrics.json" 2>/dev/null
CKPT=$(ls /tmp/gpu_runs/gpu_jsb/checkpoints/best.ckpt /tmp/gpu_runs/gpu_jsb/checkpoints/last.ckpt 2>/dev/null | head -n 1)
if [ -n "$CKPT" ]; then
    step generate_compiled 60 $PY -m armodal.generate ckpt="$CKPT" compile=true num_samples=8 \
        out_dir=/tmp/gpu_runs/gpu_jsb/generate
    ls /tmp/gpu_runs/gpu_jsb/generate >> "$OUT/generate_compiled.log" 2>&1
else
    echo "generate_compiled rc=skipped (no checkpoint)" | tee -a "$OUT/status.txt"
fi
cat "$OUT/status.txt"
