#!/usr/bin/env bash
# The GPU checks of issues 12 and 16 on one GPU, smallest first, each result written as soon as it
# exists (under $OUT, default ./gpu_results), the whole run inside a deadline ($BUDGET_S seconds,
# default 540: each step gets what is left, so a slow step shortens the ones after it, never the
# record of the ones before). Works offline: with no package index reachable it installs
# deepspeed, yunchang and their small dependencies from wheels in ./wheels (on a connected
# machine: `pip wheel --no-deps deepspeed yunchang hjson -w wheels/`, plus `pip download` of
# pydantic, pydantic-core, annotated-types, typing-inspection and decord for the GPU machine's
# Python), and puts lvita itself on PYTHONPATH (no build step).
#
#   bash benchmarks/gpu_suite.sh            # from the repository root
#   BUDGET_S=900 LONGEST_MAX=524288 bash benchmarks/gpu_suite.sh
set -uo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
BUDGET_S=${BUDGET_S:-540}
OUT=${OUT:-gpu_results}
PY=$(command -v python3 || command -v python)
mkdir -p "$OUT"
left() { local l=$((BUDGET_S - (SECONDS - START))); echo $((l < $1 ? (l > 5 ? l : 5) : $1)); }
step() { echo "== $1 (t=$((SECONDS - START))s, cap $2s)" | tee -a "$OUT/steps.txt"; }
if ! $PY -c "import deepspeed, yunchang, hjson, decord" 2>/dev/null; then
    if [ -d wheels ]; then
        $PY -m pip install -q --no-index --find-links wheels/ deepspeed yunchang hjson decord 2>&1 | tail -2
    else
        $PY -m pip install -q deepspeed yunchang hjson decord 2>&1 | tail -2
    fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch, deepspeed, yunchang, transformers as t; print('torch', torch.__version__, 'deepspeed',
deepspeed.__version__, 'transformers', t.__version__, 'flash_attn', __import__('importlib').util.find_spec('flash_attn') is not None)"
} 2>&1 | tee "$OUT/gpu.txt"
# 1. CUDA correctness, seconds each: varlen attention, ring kernels on torch's CUDA ops, uint8 tiles ahead
c=$(left 120); step "cuda tests" $c
timeout $c $PY -m pytest -q -p no:cacheprovider tests/test_varlen.py tests/test_ring_cuda.py tests/test_rank_decode.py \
    "tests/test_gpu.py::test_varlen_attention_equals_per_sample_sdpa" 2>&1 | tee "$OUT/cuda_tests.txt" | tail -4
# 2. lvita.train on longvita-1.5b, one launch each, shortest first; the optimizer-offload launch
#    (DeepSpeed builds its CPU Adam on first use) last
c=$(left 300); step "test_gpu launches" $c
timeout $c $PY -m pytest -q -s -p no:cacheprovider \
    "tests/test_gpu.py::test_plan_within_15_percent_of_the_measured_peak[8192]" \
    "tests/test_gpu.py::test_one_training_step_per_lever[checkpointing]" \
    "tests/test_gpu.py::test_one_training_step_per_lever[tiled MLP]" \
    "tests/test_gpu.py::test_one_training_step_per_lever[activation offload]" \
    "tests/test_gpu.py::test_plan_within_15_percent_of_the_measured_peak[16384]" \
    "tests/test_gpu.py::test_plan_within_15_percent_of_the_measured_peak[32768]" \
    "tests/test_gpu.py::test_one_training_step_per_lever[optimizer offload]" 2>&1 | tee "$OUT/test_gpu.txt" \
    | grep -E "GPU-RUN|passed|failed|Error" | cut -c1-400
# 3. the longest context: the transformers peer from 32K up, then lvita with tiled MLP from 128K
c=$(left 120); step "longest context: peer" $c
timeout $c $PY benchmarks/longest_context.py --levers tiled --start 131072 --max 131072 --refine 0 --steps 1 \
    --trial-timeout 100 --peer-only --out "$OUT/longest_context.jsonl" 2>&1 | tee -a "$OUT/longest_context.txt" | tail -4
c=$(left 600); step "longest context: lvita tiled" $c
timeout $c $PY benchmarks/longest_context.py --levers ${LONGEST_LEVERS:-tiled} --start 131072 \
    --max ${LONGEST_MAX:-262144} --refine 0 --steps 1 --trial-timeout $c --no-peer \
    --out "$OUT/longest_context.jsonl" 2>&1 | tee -a "$OUT/longest_context.txt" | tail -6
step "done" 0
