#!/usr/bin/env bash
# The GPU figures of issue 23 in one lease of at most ~10 minutes (benchmarks/gpu_suite.py says what
# runs, in which order, and what lands in $OUT). This wrapper installs what the GPU machine lacks from
# ./wheels (built by benchmarks/gpu_wheels.sh on a machine that reaches PyPI; carry it), offline, with
# --no-index --no-deps, checks the imports, puts lvita on PYTHONPATH and starts the clock.
#
#   bash benchmarks/gpu_suite.sh                       # GPU machine, from the repository root
#   BUDGET_S=900 MEMORY_CAP_GB=none bash benchmarks/gpu_suite.sh
#   bash benchmarks/gpu_suite.sh --dry-run             # CPU: the same steps, tiny preset, no install
set -uo pipefail
cd "$(dirname "$0")/.."
export SUITE_START=$(date +%s) OUT=${OUT:-gpu_results} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=$(command -v python3 || command -v python)
WHEELS=${WHEELS:-wheels}
mkdir -p "$OUT"
if [ "${1:-}" != "--dry-run" ] && [ "${SKIP_INSTALL:-0}" != 1 ]; then
    if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        echo "gpu_suite: no wheels in $WHEELS/: run 'bash benchmarks/gpu_wheels.sh' where PyPI is reachable and carry $WHEELS/ (or SKIP_INSTALL=1 where deepspeed and yunchang are installed)" >&2
        exit 2
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check "$WHEELS"/*.whl 2>&1 | tail -3
fi
{ command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  df -h . | tail -1
} > "$OUT/gpu.txt" 2>&1
if ! "$PY" -c "import sys, deepspeed, yunchang, hjson, pydantic, tensorboard, psutil, PIL, torch, transformers as t
print('python', sys.version.split()[0], 'torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'yunchang',
      yunchang.__version__, 'transformers', t.__version__, 'flash_attn', __import__('importlib').util.find_spec('flash_attn') is not None)" \
        >>"$OUT/gpu.txt" 2>"$OUT/import_error.txt"; then
    echo "gpu_suite: cannot import what lvita.train needs: $(tail -1 "$OUT/import_error.txt")" >&2
    exit 2
fi
rm -f "$OUT/import_error.txt"
cat "$OUT/gpu.txt"
exec "$PY" benchmarks/gpu_suite.py "$@"
