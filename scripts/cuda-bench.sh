#!/usr/bin/env bash
# The GPU check of issue 13, in one run on a machine with an NVIDIA GPU and no network (a GPU
# machine here): every fixture on CUDA against the reference and the CPU, then decode and prefill
# speed on random checkpoints of real layouts beside the memory-bandwidth floor.
#
#   here:  scripts/cuda-check.sh --build
#          scripts/random_checkpoint.py pack /work/bench-e2b /work/bench-model-lc-bf16 -o gpu/models
#          cp target/cuda/release/llmarch gpu/   (gpu/ is git-ignored; copy it to the GPU machine)
#   there: scripts/cuda-bench.sh gpu/llmarch gpu/models OUT_DIR
#          (BASE=gpu/llmarch-before: every speed run made by both binaries, one after the other;
#          DTYPES="bf16": the speed runs' weight types, bf16 and f32 by default;
#          SHAPES="32 128,2048 64": prompt and new tokens of each run; ROUNDS=3: runs of each;
#          FIXTURES=0: speed only)
#
# Needs python3 with torch and safetensors there (for the fixture comparison and the random
# weights), and cuBLAS/cuRAND/NVRTC/cudart 13 somewhere under /usr/local, /opt or /usr/lib (a CUDA 13
# toolkit or PyTorch's cu13 wheels): found and put on LD_LIBRARY_PATH here.
set -uo pipefail
BIN=$(realpath "$1") PAYLOAD=$(realpath "$2") OUT=$(realpath "$3")
mkdir -p "$OUT"
libs=$(find /usr/local /opt /usr/lib -xdev \( -name 'libcublas.so.13' -o -name 'libcublasLt.so.13' \
    -o -name 'libcurand.so.10' -o -name 'libnvrtc.so.13' -o -name 'libcudart.so.13' \) -printf '%h\n' 2>/dev/null | sort -u | tr '\n' ':')
export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:-}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
ldd "$BIN" | grep -E 'cuda|cublas|curand|nvrtc|cudart|not found'
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
python3 - <<'PY'
import torch, time
x = torch.empty(2 << 30, dtype=torch.uint8, device="cuda"); y = torch.empty_like(x)
for _ in range(3): y.copy_(x)
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(20): y.copy_(x)
torch.cuda.synchronize(); dt = (time.perf_counter() - t) / 20
print(f"copy bandwidth (read + write): {2 * x.numel() / dt / 1e12:.2f} TB/s")
PY

if [ "${FIXTURES:-1}" = 1 ]; then
    echo "== fixtures"
    python3 scripts/cuda_fixtures.py "$BIN" "$OUT/fixtures.json" 2>&1 | tee "$OUT/fixtures.log"
fi

echo "== speed"
for m in "$PAYLOAD"/*/; do
    python3 scripts/random_checkpoint.py make "$m" "/tmp/models/$(basename "$m")" >/dev/null || exit 1
done
# BASE=another llmarch: each run is made by both, one after the other (ratios from one session).
BINS=("$BIN")
[ -n "${BASE:-}" ] && BINS+=("$(realpath "$BASE")")
DTYPES=${DTYPES:-bf16 f32}
: >"$OUT/bench.jsonl"
for m in /tmp/models/*/; do
    name=$(basename "$m")
    # Weight bytes one decode step reads at most: every tensor but the per-layer-embedding table
    # (rows looked up), the token embedding counted once (the tied output head reads all of it).
    # (An MoE reads only its chosen experts: its floor is lower than this bound says.)
    floor_params=$(python3 -c "
import json, math
h = json.load(open('$PAYLOAD/$name/headers.json'))
print(sum(math.prod(s) for ts in h.values() for k, d, s in ts if 'embed_tokens_per_layer' not in k))")
    for dtype in $DTYPES; do
        IFS=, read -ra shapes <<<"${SHAPES:-32 128,2048 8}"
        for shape in "${shapes[@]}"; do
            set -- $shape
            for round in $(seq "${ROUNDS:-1}"); do for bin in "${BINS[@]}"; do
                nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >/tmp/mem &
                smi=$!
                j=$("$bin" run "$m" --device cuda --dtype "$dtype" --prompt-ids "$(seq -s, 1000 $((999 + $1)))" \
                    -n "$2" --temperature 0 --json 2>/tmp/err | tail -1)
                kill $smi; wait $smi 2>/dev/null
                [ -n "$j" ] || { echo "$name $dtype $1+$2 $bin: $(tail -3 /tmp/err)"; continue; }
                peak=$(sort -n /tmp/mem | tail -1)
                python3 -c "
import json, sys
j = json.loads(sys.argv[1]); params = int(sys.argv[2]); per = 2 if '$dtype' == 'bf16' else 4
r = dict(bin='$(basename "$bin")', model='$name', dtype='$dtype', prompt=$1, new=$2,
         gpu_mem_peak_mib=int('$peak' or 0), prefill_tok_s=round(j['prefill_tok_s'], 1),
         decode_tok_s=round(j['decode_tok_s'], 1), load_s=round(j['load_s'], 2),
         kernels=j['kernels'], weight_bytes_per_token=params * per)
print(json.dumps(r))" "$j" "$floor_params" | tee -a "$OUT/bench.jsonl"
            done; done
        done
    done
done
