#!/usr/bin/env bash
# Build-check the CUDA backend with no GPU at hand: install a pinned CUDA 13.0 toolkit from the
# Python package index into a private folder (target/cuda-toolkit), then `cargo check` and
# `cargo clippy -D warnings` with `--features cuda` in their own target folder (target/cuda).
# CUDA 13.0 because the GPU machines here run driver 580, which refuses PTX from a newer nvcc.
# Not part of .ci/run (it compiles candle's CUDA kernels: long on two cores). Run it before a
# submission that touches device code.
#   scripts/cuda-check.sh            (CUDA_COMPUTE_CAP defaults to 90, an H100/H200)
#   scripts/cuda-check.sh --build    (also a release binary, target/cuda/release/llmarch, to carry
#                                     to a GPU machine: see scripts/cuda-bench.sh; and the
#                                     op_cost and step_times examples)
# --build links against stub libraries made here from the symbols cudarc calls (libcuda, cuBLAS,
# cuBLASLt, cuRAND, NVRTC: the toolkit's real ones are gigabytes of wheels); the binary finds the
# real ones at run time through the loader (the driver's libcuda.so.1, the toolkit's or PyTorch's
# libcublas.so.13, libcublasLt.so.13, libcurand.so.10, libnvrtc.so.13, libcudart.so.13).
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
[ "${1:-}" = --build ] || exit 0

# Stubs: one shared library per real one, named for the linker (libcuda.so, not the loader's
# libcuda.so.1) and carrying the real soname, defining every symbol of its prefix that cudarc's
# objects leave undefined.
cargo build --locked --release --features cuda --lib
S="$T/stubs" && rm -rf "$S" && mkdir -p "$S"
rlib=$(ls -t "$CARGO_TARGET_DIR"/release/deps/libcudarc-*.rlib | head -1)
nm -A "$rlib" 2>/dev/null | awk '$2 == "U" {print $3}' | sort -u >"$S/undefined"
stub() { # NAME SONAME REGEX
    grep -E "$3" "$S/undefined" | sed 's/.*/void &(void) {}/' >"$S/$1.c"
    cc -shared -fPIC -o "$S/lib$1.so" -Wl,-soname,"$2" "$S/$1.c"
}
stub cuda libcuda.so.1 '^cu[A-Z]'
stub cublasLt libcublasLt.so.13 '^cublasLt'
stub cublas libcublas.so.13 '^cublas([^L]|L[^t])'
stub curand libcurand.so.10 '^curand'
stub nvrtc libnvrtc.so.13 '^nvrtc'
# candle-kernels' MoE kernels (a static library) call the runtime: the wheel's real one.
ln -s "$T/lib/libcudart.so.13" "$S/libcudart.so"
cargo rustc --locked --release --features cuda --bin llmarch -- -L "native=$S"
# Two benchmarks for the GPU machine: the cost of one op (examples/op_cost.rs) and of each decode
# step (examples/step_times.rs).
for e in op_cost step_times; do
    cargo rustc --locked --release --features cuda --example $e -- -L "native=$S"
done
ls -l "$CARGO_TARGET_DIR/release/llmarch" "$CARGO_TARGET_DIR"/release/examples/{op_cost,step_times}
