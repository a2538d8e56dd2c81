#!/usr/bin/env bash
# Build-check the CUDA backend with no GPU at hand: install a pinned CUDA 13.0 toolkit from the
# Python package index into a private folder (target/cuda-toolkit), then `cargo check` and
# `cargo clippy -D warnings` with `--features cuda` in their own target folder (target/cuda).
# CUDA 13.0 because the GPU machines here run driver 580, which refuses PTX from a newer nvcc.
# Not part of .ci/run (it compiles candle's CUDA kernels: long on two cores). Run it before a
# submission that touches device code.
#   scripts/cuda-check.sh            (CUDA_COMPUTE_CAP defaults to 90, an H100/H200)
set -euo pipefail
cd "$(dirname "$0")/.."
T=$PWD/target/cuda-toolkit
PY=${PY:-python3}
if [ ! -x "$T/bin/nvcc" ]; then
    rm -rf "$T" && mkdir -p "$T"
    "$PY" -m pip install -q --target "$T/pkgs" --no-deps \
        nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-crt==13.0.88 \
        nvidia-nvvm==13.0.88 nvidia-cuda-cccl==13.0.85
    # The wheels hold pieces of the toolkit; nvcc wants them in one tree (bin, nvvm, include,
    # lib64), so link them together.
    for d in "$T"/pkgs/nvidia/*/ "$T"/pkgs/nvidia/cu13/; do
        [ -d "$d" ] || continue
        for sub in bin include lib lib64 nvvm; do
            [ -d "$d/$sub" ] || continue
            mkdir -p "$T/$sub"
            cp -rsn "$d/$sub/." "$T/$sub/"
        done
    done
    [ -d "$T/lib" ] && [ ! -e "$T/lib64" ] && ln -s lib "$T/lib64"
fi
"$T/bin/nvcc" --version | tail -2
export PATH="$T/bin:$PATH" CUDA_ROOT="$T" CUDA_PATH="$T" CUDA_HOME="$T"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}" CUDARC_CUDA_VERSION=13000
export CARGO_TARGET_DIR="$PWD/target/cuda"
cargo check --locked --features cuda --all-targets
cargo clippy --locked --features cuda --all-targets -- -D warnings
echo "cuda build check: ok"
