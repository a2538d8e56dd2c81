#!/usr/bin/env bash
# llmarch vs transformers on one checkpoint, same threads, interleaved rounds; see bench/README.md.
#
#   bench/run.sh [MODEL_DIR]            (default $MODEL, else /work/bench-model)
#   MODEL=/work/bench-laguna bench/run.sh
#
# Environment (defaults in brackets):
#   THREADS [2]  ROUNDS [3]  PROMPT_TOKENS [64]  NEW_TOKENS [32]  DTYPE [f32: f32|bf16]
#   LLMARCH [target/release/llmarch]  PYTHON [/work/oracle-env/venv/bin/python]
#   LLMARCH_DTYPE [DTYPE]  llmarch's --dtype for the main variant (e.g. q8_0)
#   LLMARCH_ARGS   extra `llmarch run` flags for the main variant
#   ALSO_DTYPES    more llmarch variants in the same rounds, one per --dtype (e.g. "f32 bf16")
#   CANDLE=1       also time llmarch with candle's matmul (LLMARCH_KERNELS=candle)
#   BASELINE=PATH  also time another llmarch binary (e.g. a build from before a change)
#   NO_TRANSFORMERS=1  skip the transformers side
# Builds nothing: run `cargo build --release` first.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${1:-${MODEL:-/work/bench-model}}
THREADS=${THREADS:-2}
ROUNDS=${ROUNDS:-3}
PROMPT_TOKENS=${PROMPT_TOKENS:-64}
NEW_TOKENS=${NEW_TOKENS:-32}
DTYPE=${DTYPE:-f32}
LLMARCH=${LLMARCH:-target/release/llmarch}
PYTHON=${PYTHON:-/work/oracle-env/venv/bin/python}
LLMARCH_DTYPE=${LLMARCH_DTYPE:-$DTYPE}
LLMARCH_ARGS=${LLMARCH_ARGS:-}
ALSO_DTYPES=${ALSO_DTYPES:-}

die() { echo "bench/run.sh: $*" >&2; exit 1; }
[ -x "$LLMARCH" ] || die "no $LLMARCH: build it first (cargo build --release)"
[ -z "${BASELINE:-}" ] || [ -x "$BASELINE" ] || die "BASELINE=$BASELINE is not an executable"
[ -f "$MODEL/config.json" ] || die "$MODEL has no config.json"
if [ -z "${NO_TRANSFORMERS:-}" ]; then
  [ -x "$PYTHON" ] || die "no python at $PYTHON (set PYTHON, or NO_TRANSFORMERS=1)"
fi

# The prompt: BOS (2) then a fixed spread of ids below the vocabulary size, the same for both.
IDS=$(python3 - "$MODEL/config.json" "$PROMPT_TOKENS" <<'EOF'
import json, sys
cfg = json.load(open(sys.argv[1]))
vocab = cfg.get("vocab_size") or cfg.get("text_config", {}).get("vocab_size")
n = int(sys.argv[2])
print(",".join(str(2 if i == 0 else (i * 7919) % (vocab - 200) + 100) for i in range(n)))
EOF
)

OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
export RAYON_NUM_THREADS=$THREADS CANDLE_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS

run_llmarch() { # FILE BINARY KERNELS DTYPE [extra flags]
  local file=$1 bin=$2 kernels=$3 dtype=$4; shift 4
  LLMARCH_KERNELS=$kernels "$bin" --quiet run "$MODEL" --prompt-ids "$IDS" -n "$NEW_TOKENS" \
    --temperature 0 --dtype "$dtype" --json "$@" | tail -n 1 >>"$OUT/$file"
}

echo "model $MODEL · $THREADS threads · $PROMPT_TOKENS-token prompt · $NEW_TOKENS new tokens · $DTYPE · $ROUNDS interleaved rounds" >&2
for r in $(seq 1 "$ROUNDS"); do
  echo "round $r/$ROUNDS (load $(cut -d' ' -f1-3 /proc/loadavg))" >&2
  # shellcheck disable=SC2086
  run_llmarch llmarch.jsonl "$LLMARCH" auto "$LLMARCH_DTYPE" $LLMARCH_ARGS
  for d in $ALSO_DTYPES; do
    run_llmarch "also-$d.jsonl" "$LLMARCH" auto "$d"
  done
  if [ -n "${CANDLE:-}" ]; then
    run_llmarch candle.jsonl "$LLMARCH" candle "$DTYPE"
  fi
  if [ -n "${BASELINE:-}" ]; then
    run_llmarch baseline.jsonl "$BASELINE" auto "$DTYPE"
  fi
  if [ -z "${NO_TRANSFORMERS:-}" ]; then
    "$PYTHON" bench/transformers_bench.py "$MODEL" --prompt-ids "$IDS" --new-tokens "$NEW_TOKENS" \
      --threads "$THREADS" --runs 1 --warmup 1 --dtype "$DTYPE" 2>/dev/null | tail -n 1 >>"$OUT/transformers.jsonl"
  fi
done

python3 - "$OUT" "$MODEL" "$DTYPE" "$LLMARCH_DTYPE $LLMARCH_ARGS" "$ALSO_DTYPES" <<'EOF'
import json, os, statistics, struct, sys

out, model, dtype, extra, also = sys.argv[1:6]
extra = extra.strip()
extra = "" if extra == dtype else extra

def load(name):
    p = os.path.join(out, name)
    return [json.loads(l) for l in open(p) if l.strip()] if os.path.exists(p) else []

def med(rows, key):
    return statistics.median(r[key] for r in rows)

# Weight bytes: every tensor's elements × the loaded dtype's size (from the safetensors headers).
numel = 0
for f in sorted(os.listdir(model)):
    if f.endswith(".safetensors"):
        with open(os.path.join(model, f), "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for k, v in header.items():
            if k != "__metadata__":
                c = 1
                for d in v["shape"]:
                    c *= d
                numel += c
weight_bytes = numel * {"f32": 4, "bf16": 2}[dtype]

variants = [("llmarch" + (f" {extra}" if extra else ""), load("llmarch.jsonl"))]
variants += [(f"llmarch {d}", load(f"also-{d}.jsonl")) for d in also.split()]
variants += [("llmarch (candle matmul)", load("candle.jsonl")),
            ("llmarch baseline", load("baseline.jsonl")),
            ("transformers", load("transformers.jsonl"))]
variants = [(n, rows) for n, rows in variants if rows]
tf = dict(variants).get("transformers")
print(f"{'':26} {'prefill tok/s':>14} {'decode tok/s':>13} {'peak RSS':>10} {'RSS/weights':>12}   runs (prefill/decode)")
for name, rows in variants:
    p, d = med(rows, "prefill_tok_s"), med(rows, "decode_tok_s")
    rss = med(rows, "peak_rss_bytes") if all(r.get("peak_rss_bytes") for r in rows) else None
    runs = " ".join(f"{r['prefill_tok_s']:.0f}/{r['decode_tok_s']:.1f}" for r in rows)
    rss_s = f"{rss / 2**20:8.0f} MB {rss / weight_bytes:11.2f}×" if rss else f"{'':10} {'':12}"
    print(f"{name:26} {p:14.1f} {d:13.1f} {rss_s}   {runs}")
if tf:
    for name, rows in variants:
        if name != "transformers":
            print(f"{name} / transformers: prefill {med(rows, 'prefill_tok_s') / med(tf, 'prefill_tok_s'):.2f}×, "
                  f"decode {med(rows, 'decode_tok_s') / med(tf, 'decode_tok_s'):.2f}×")
    b = tf[-1]["generated_ids"]
    for name, rows in variants:
        if name == "transformers":
            continue
        a = rows[-1]["generated_ids"]
        same = sum(1 for x, y in zip(a, b) if x == y)
        note = (" (its weights are rounded: on these random checkpoints any weight change grows layer "
                "after layer, see bench/README.md)") if any(q in name for q in ("q8_0", "bf16", "f16")) and dtype == "f32" else ""
        print(f"greedy tokens: {name} and transformers agree on {same} of the first {min(len(a), len(b))}{note}")
print(f"weights: {numel / 1e9:.3f} B parameters = {weight_bytes / 2**20:.0f} MB in {dtype}; "
      f"target peak RSS ≤ 1.3× = {1.3 * weight_bytes / 2**20:.0f} MB")
EOF
