#!/usr/bin/env bash
# Build ./wheels for the lent GPU machine, which reaches no package index: CPython 3.12, x86-64
# manylinux, torch already there (its image: /work/.library/device/KINDS.md lists torch, numpy,
# tensorboard, pillow, pytest, psutil, msgpack, ninja, py-cpuinfo, einops, huggingface-hub, ...).
# Run it on a machine that reaches PyPI (any Python; the wheels are chosen for 3.12 there):
#
#   bash benchmarks/gpu_wheels.sh            # -> wheels/ (git-ignored), about 18 MB; gpu_suite.sh installs it
#
# What goes in, pinned to the versions lvita's suite is tested with:
# - what DeepSpeed needs beyond torch: deepspeed itself, hjson, pydantic and its parts (pydantic-core is
#   compiled: the cp312 wheel), plus its small runtime deps einops, msgpack, psutil, py-cpuinfo and ninja
#   (the CPU-Adam JIT build), which a machine with only torch + transformers lacks;
# - yunchang (it needs only torch; its kernels import flash-attn and friends optionally);
# - transformers 5.24 (the GPU image has 5.17; lvita's model code is tested on 5.24): its own needs
#   (huggingface-hub >= 1.31, tokenizers 0.23, safetensors, regex, typer) are in that image.
# Not carried: torch (the image's CUDA build), decord/av/datasets (the suite reads no video and no
# parquet), flash-attn (optional; torch's own kernels are the GPU default).
# deepspeed and yunchang are source-only on PyPI: built here with `pip wheel --no-deps` (pure Python;
# DS_BUILD_OPS=0, so DeepSpeed JIT-builds its ops where they run). SOURCE_DATE_EPOCH fixes the zip
# timestamps of those two, so a rebuild gives the same files (sha256 listed in wheels/SHA256SUMS).
set -euo pipefail
cd "$(dirname "$0")/.."
W=${WHEELS:-wheels}
PY=${PY:-$(command -v python3 || command -v python)}
BINARY=(hjson==3.1.0 pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2
        typing-extensions==4.16.0 einops==0.8.2 msgpack==1.2.4 psutil==7.2.2 py-cpuinfo==9.0.0 ninja==1.13.2
        transformers==5.24.0)
SOURCE=(deepspeed==0.19.8 yunchang==0.6.4)
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux_2_5_x86_64 manylinux1_x86_64; do PLATFORMS+=(--platform "$p"); done

rm -rf "$W" && mkdir -p "$W"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
    --abi abi3 --abi none "${PLATFORMS[@]}" -d "$W" "${BINARY[@]}"
SOURCE_DATE_EPOCH=1700000000 DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-binary deepspeed,yunchang \
    -w "$W" "${SOURCE[@]}"

# One wheel per pinned project, each one CPython 3.12 x86-64 Linux can install.
fail=0
for spec in "${BINARY[@]}" "${SOURCE[@]}"; do
    name=${spec%%==*}; stem=$(echo "$name" | tr '-' '_')
    n=$(ls "$W" | grep -ic "^${stem}-${spec##*==}-" || true)
    [ "$n" = 1 ] || { echo "gpu_wheels: expected one wheel of $spec in $W, found $n" >&2; fail=1; }
done
for f in "$W"/*.whl; do
    case "$f" in *-py3-none-any.whl|*-py2.py3-none-any.whl|*cp312*x86_64.whl|*abi3*x86_64.whl|*-py3-none-manylinux*x86_64.whl) ;;
        *) echo "gpu_wheels: $f is not for CPython 3.12 on x86-64 Linux" >&2; fail=1 ;; esac
done
[ $fail = 0 ] || exit 1
(cd "$W" && sha256sum ./*.whl > SHA256SUMS)
echo "gpu_wheels: $(ls "$W"/*.whl | wc -l) wheels, $(du -sh "$W" | cut -f1) in $W/ (carry it: run(carry=[\"$W\"]))"
