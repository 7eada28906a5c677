#!/usr/bin/env bash
# The issue-12 GPU check in one call (about 6 minutes on one H100, each bench capped by `timeout`):
#
#     bash bench/gpu_check.sh [BANDWIDTH_GBS] [PEAK_TFLOPS]      # defaults: H100 SXM, 3350 GB/s and 989 TFLOPS
#
# 1. decode: ms per decode step at 7B shapes, 8 questions x G 6 = 48 sequences, 16 new tokens, 10 s clips,
#    static engine (CUDA graph) and eager loop, beside the bandwidth bound        target: <= 15 ms
# 2. grpo:   one GRPO step at 7B shapes, naive vs shared vs static, phase split      target: speedup >= 3
#    (2 questions: where the naive layout fits)
# 3. grpo-batch: the report's batch, 8 questions x G 6, 30 s clips, static layout alone, its reference and policy
#    passes 4 questions at a time (batch.update_chunk: 4, as the 7B recipes), peak memory      target: fits 80 GB
# 4. sft:    the recipe's LoRA SFT step at 7B shapes, 30 s clips, micro-batch 8, MFU of the needed FLOPs
#                                                                                   target: mfu >= 0.40
# Each prints its last line as the bench does; a bench that fails or times out says so and the next one runs.
set -u
cd "$(dirname "$0")/.."
BW=${1:-3350}
PEAK=${2:-989}
PY=${PYTHON:-python}
export PYTHONPATH=${PYTHONPATH:-.}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true

step() {  # name, seconds, command...
  local name=$1 limit=$2
  shift 2
  echo "== $name (timeout ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | grep -v -i "warn\|Loading weights\|it/s\]" | tail -n 8
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - t0)) s"
}

step decode 70 "$PY" bench/decode_speed.py --seven-b --device cuda --dtype bfloat16 --questions 8 --generations 6 \
  --max-new-tokens 16 --clip-seconds 10 --repeats 3 --bandwidth-gbs "$BW"
step grpo 80 "$PY" bench/grpo_step.py --seven-b --device cuda --dtype bfloat16 --questions 2 --generations 6 \
  --max-new-tokens 16 --clip-seconds 10 10 --steps 2 --no-memory
step grpo-batch 150 "$PY" bench/grpo_step.py --seven-b --device cuda --dtype bfloat16 --questions 8 --generations 6 \
  --max-new-tokens 16 --clip-seconds 30 30 --steps 2 --layouts static --update-chunk 4
step sft 80 "$PY" bench/sft_step.py --seven-b --batch 8 --clips full --steps 3 --warmup 1 --peak-tflops "$PEAK"
