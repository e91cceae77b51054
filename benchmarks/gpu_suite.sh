#!/usr/bin/env bash
# The GPU checks of issue 12 on one GPU, smallest first, each result written as soon as it exists
# (under $OUT, default ./gpu_results). Works offline: with no package index reachable it installs
# deepspeed, yunchang and their small dependencies from wheels in ./wheels (pip wheel/download them
# on a connected machine: `pip wheel --no-deps deepspeed yunchang -w wheels/` plus hjson msgpack
# py-cpuinfo ninja), then lvita itself without dependencies. Budget: under 9 minutes.
#
#   bash benchmarks/gpu_suite.sh            # from the repository root
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
if ! python -c "import deepspeed, yunchang" 2>/dev/null; then
    if [ -d wheels ]; then
        pip install --no-index --find-links wheels/ deepspeed yunchang hjson msgpack py-cpuinfo ninja 2>&1 | tail -1
    else
        pip install deepspeed yunchang 2>&1 | tail -1
    fi
fi
pip install --no-deps -e . 2>&1 | tail -1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
# 1. correctness, smallest first (varlen attention, one step per lever, plan vs measured)
timeout 300 python -m pytest -q -x tests/test_gpu.py 2>&1 | tee "$OUT/test_gpu.txt" | tail -5
# 2. the longest sequence one GPU trains, per lever set, and the transformers peer
timeout 240 python benchmarks/longest_context.py --start 65536 --max 1048576 --refine 0 --steps 1 \
    --trial-timeout 120 --out "$OUT/longest_context.jsonl" 2>&1 | tee "$OUT/longest_context.txt" | tail -12
