#!/usr/bin/env bash
# llmarch vs llama.cpp on the same weights, per weight type, interleaved rounds.
#
#   bench/vs-llamacpp.sh [MODEL_DIR [GGUF_DIR]]
#   TYPES="f32 bf16 q8_0" ROUNDS=1 bench/vs-llamacpp.sh                   # the 0.2 B bench model
#   TYPES="bf16 q8_0 q4_0" bench/vs-llamacpp.sh /work/bench-e2b           # real-size E2B
#   PROMPT_TOKENS=8192 NEW_TOKENS=4 bench/vs-llamacpp.sh                  # long prompt
#   MODEL_bf16=/work/bench-model-lc-bf16 bench/vs-llamacpp.sh             # llmarch bf16 from a bf16 checkpoint
#
# What it needs (it builds nothing):
#   - llmarch: `cargo build --release` (target/release/llmarch);
#   - llama.cpp: ../shared/bench/build-llamacpp.sh DIR (llama-bench, llama-quantize, its converter);
#   - GGUF_DIR/<type>.gguf for each type, the same weights converted by llama.cpp:
#       PY=/work/oracle-env/venv/bin/python
#       $PY bench/convert-gguf.py DIR/src MODEL --outtype f32 --outfile GGUF_DIR/f32.gguf   (and bf16)
#       DIR/bin/llama-quantize GGUF_DIR/f32.gguf GGUF_DIR/q8_0.gguf Q8_0                    (and Q4_0)
#     (bench/convert-gguf.py is llama.cpp's convert_hf_to_gguf.py with Gemma 4's per-layer-embedding
#     table streamed in chunks; same output, 19 GB less memory on E2B). For a bf16 checkpoint, quantize
#     from bf16.gguf. llama-quantize's Q4_0 stores token_embd and per_layer_token_embd as Q6_K (its
#     default; --pure would make them Q4_0);
#   - /usr/bin/time (Debian package `time`).
# The default model is /work/bench-model-lc, not /work/bench-model: llama.cpp's Gemma 4 KV sharing is
# hard-wired to E2B's layout (a shared sliding layer reads layer n_unshared - 2, a shared full layer
# n_unshared - 1; src/llama-model.cpp) and aborts on the bench model's (GGML_ASSERT in llama-kv-cache.cpp).
# /work/bench-model-lc is the same bench model with layers S S S S S F S S S F (same size and work per
# token): tests/oracle/gemma4_realsize.py --bench-llamacpp /work/bench-model-lc.
#
# Per round, per type (in TYPES order): llmarch, then llama.cpp, so a noisy neighbour hits both.
# Both warm up once before they are timed: llama-bench runs its own warm-up inside its process,
# llmarch is first run once untimed (the same command with -n 1, WARMUP=0 to skip), so the page
# cache holds its checkpoint as llama-bench's warm-up leaves llama.cpp's (at real size the two
# programs' files do not fit the page cache together, so each evicts the other's between runs).
# llmarch's own process state is not warmed: its prefill is still a fresh process's first forward.
#   llmarch:   llmarch --quiet run MODEL --prompt-ids IDS -n NEW_TOKENS --temperature 0 --dtype TYPE --json
#              with RAYON_NUM_THREADS=CANDLE_NUM_THREADS=OMP_NUM_THREADS=THREADS. From its last stdout line:
#              prefill_tok_s (prompt / first forward), decode_tok_s (single-token forwards after it),
#              load_s, peak_rss_bytes (VmHWM). IDS: BOS (2) then a fixed pseudo-random spread of ids below
#              the vocabulary size. A type llmarch refuses (e.g. --dtype q4_0 before it exists) is
#              reported as failed with its error line, and the script goes on.
#   llama.cpp: /usr/bin/time -v llama-bench -m GGUF_DIR/TYPE.gguf -p PROMPT_TOKENS -n NEW_TOKENS -t THREADS
#              -r 1 -o json (its defaults otherwise: one warm-up run per test, mmap, flash attention
#              auto, batch 2048 / ubatch 512; each test gets a context of its own length, so -p 8192
#              just works). prefill = the pp test's avg_ts, decode = the tg test's avg_ts. llama-bench
#              feeds its own random token ids (it takes no ids); for a dense model the speed does not
#              depend on which ids. Its tg test decodes from an empty context, while llmarch decodes after
#              the prompt: with a long prompt (PROMPT_TOKENS=8192 NEW_TOKENS=4) compare prefill and RSS;
#              the decode columns then differ by the attention over the prompt (LLAMA_BENCH_ARGS="-d N"
#              would put llama.cpp's tests at depth N, its prefill test included).
#              Peak RSS = `Maximum resident set size` of that same llama-bench process (/usr/bin/time -v):
#              the weights it touched (mmapped pages count, as they do in llmarch's VmHWM), its contexts
#              (PROMPT_TOKENS and NEW_TOKENS long, one after the other) and compute buffers. llama-bench is
#              the llama.cpp binary used for the memory figure because it is the one that runs a fixed
#              number of prompt and generated tokens non-interactively (this llama.cpp's llama-cli is
#              chat-only and takes text, not ids; llama-completion / llama-simple are not built by
#              build-llamacpp.sh); a prompt + generation run in one context would hold NEW_TOKENS more
#              tokens of KV cache, a few MB at most here.
#              Load = llama.cpp's own `load time` (llama_perf_context_print, printed with -v) from a second,
#              short process right after: llama-bench -p 0 -n 1 -r 1 --no-warmup -v (one context, one
#              single-token decode). llama.cpp counts load from the start of model loading to the end of the
#              context's first decode, so that mmap's deferred page faults are included: the figure is
#              "load + the first token", like a user's time to first token for a 1-token prompt; that
#              decode's own time (`first_decode_s` in the raw lines) is part of it.
# The medians of the rounds are printed as a markdown table with the ratios llmarch / llama.cpp (prefill,
# decode: > 1 is llmarch faster; RSS, load: < 1 is llmarch smaller / quicker), then every run.
#
# Environment (defaults in brackets):
#   THREADS [2]  ROUNDS [3]  PROMPT_TOKENS [64]  NEW_TOKENS [32]  TYPES ["f32 bf16 q8_0 q4_0"]
#   MODEL (or the 1st argument) [/work/bench-model-lc]   llmarch's checkpoint
#   GGUF_DIR (or the 2nd argument) [MODEL/gguf]       holds <type>.gguf
#   MODEL_<type>   llmarch's checkpoint for that type only (e.g. MODEL_bf16=/work/bench-model-lc-bf16)
#   LLMARCH [target/release/llmarch]   LLAMA_CPP [/work/llama.cpp] (its bin/llama-bench), or LLAMA_BENCH
#   LLMARCH_ARGS, LLAMA_BENCH_ARGS     extra flags for each side
#   MAX_CONTEXT    llmarch's --max-context [PROMPT_TOKENS + NEW_TOKENS when that exceeds the model's
#                  max_position_embeddings, else unset]
#   WARMUP [1]     0: no untimed llmarch run before each timed one
#   RESULTS=DIR    keep the raw per-run JSON lines and logs there, replacing a previous run's for the same
#                  types (default: a temporary folder, removed)
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${1:-${MODEL:-/work/bench-model-lc}}
GGUF_DIR=${2:-${GGUF_DIR:-$MODEL/gguf}}
THREADS=${THREADS:-2}
ROUNDS=${ROUNDS:-3}
PROMPT_TOKENS=${PROMPT_TOKENS:-64}
NEW_TOKENS=${NEW_TOKENS:-32}
TYPES=${TYPES:-f32 bf16 q8_0 q4_0}
LLMARCH=${LLMARCH:-target/release/llmarch}
LLAMA_CPP=${LLAMA_CPP:-/work/llama.cpp}
LLAMA_BENCH=${LLAMA_BENCH:-$LLAMA_CPP/bin/llama-bench}
LLMARCH_ARGS=${LLMARCH_ARGS:-}
LLAMA_BENCH_ARGS=${LLAMA_BENCH_ARGS:-}
TIME=${TIME:-/usr/bin/time}
WARMUP=${WARMUP:-1}

die() { echo "bench/vs-llamacpp.sh: $*" >&2; exit 1; }
[ -x "$LLMARCH" ] || die "no $LLMARCH: build it first (cargo build --release)"
[ -x "$LLAMA_BENCH" ] || die "no $LLAMA_BENCH: build llama.cpp (../shared/bench/build-llamacpp.sh $LLAMA_CPP) or set LLAMA_BENCH"
[ -x "$TIME" ] || die "no $TIME (apt-get install time)"
[ -f "$MODEL/config.json" ] || die "$MODEL has no config.json"

# BOS (2) then a fixed spread of ids below the vocabulary size; and the model's own context length.
read -r IDS MAX_POS < <(python3 - "$MODEL/config.json" "$PROMPT_TOKENS" <<'EOF'
import json, sys
cfg = json.load(open(sys.argv[1]))
text = cfg.get("text_config") or cfg
vocab = text["vocab_size"]
n = int(sys.argv[2])
print(",".join(str(2 if i == 0 else (i * 7919) % (vocab - 200) + 100) for i in range(n)),
      text.get("max_position_embeddings") or 0)
EOF
)
if [ -z "${MAX_CONTEXT:-}" ] && [ "$MAX_POS" -gt 0 ] && [ $((PROMPT_TOKENS + NEW_TOKENS)) -gt "$MAX_POS" ]; then
  MAX_CONTEXT=$((PROMPT_TOKENS + NEW_TOKENS))
fi
CTX_FLAG=${MAX_CONTEXT:+--max-context $MAX_CONTEXT}

if [ -n "${RESULTS:-}" ]; then
  OUT=$RESULTS; mkdir -p "$OUT"
  for t in $TYPES; do rm -f "$OUT/llmarch-$t.jsonl" "$OUT/llamacpp-$t.jsonl"; done
else
  OUT=$(mktemp -d); trap 'rm -rf "$OUT"' EXIT
fi
export RAYON_NUM_THREADS=$THREADS CANDLE_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS

err_line() { # LOG -> its first error line, else its last non-empty line
  grep -m 1 -iE 'error|assert|abort' "$1" || grep -v '^[[:space:]]*$' "$1" | tail -n 1 || true
}
json_str() { python3 -c 'import json, sys; print(json.dumps(sys.argv[1].strip()))' "$1"; }

model_for() { # TYPE -> llmarch's checkpoint for it
  local v="MODEL_$1"
  echo "${!v:-$MODEL}"
}

run_llmarch() { # TYPE ROUND
  local t=$1 r=$2 m log line
  m=$(model_for "$t")
  log="$OUT/llmarch-$t-$r.log"
  if [ "$WARMUP" != 0 ]; then # untimed, as llama-bench's own warm-up run (see the header)
    # shellcheck disable=SC2086
    "$LLMARCH" --quiet run "$m" --prompt-ids "$IDS" -n 1 --temperature 0 --dtype "$t" $CTX_FLAG \
      $LLMARCH_ARGS >/dev/null 2>&1 || true
  fi
  # shellcheck disable=SC2086
  if "$LLMARCH" --quiet run "$m" --prompt-ids "$IDS" -n "$NEW_TOKENS" --temperature 0 --dtype "$t" --json \
      $CTX_FLAG $LLMARCH_ARGS >"$log.out" 2>"$log" && line=$(tail -n 1 "$log.out") && [ "${line:0:1}" = "{" ]; then
    echo "$line" >>"$OUT/llmarch-$t.jsonl"
  else
    echo "  llmarch --dtype $t failed: $(err_line "$log")" >&2
    echo "{\"failed\": $(json_str "$(err_line "$log")")}" >>"$OUT/llmarch-$t.jsonl"
  fi
}

run_llamacpp() { # TYPE ROUND
  local t=$1 r=$2 g="$GGUF_DIR/$1.gguf" log="$OUT/llamacpp-$1-$2"
  if [ ! -f "$g" ]; then
    echo "  llama.cpp $t: no $g" >&2
    echo "{\"failed\": \"no $g\"}" >>"$OUT/llamacpp-$t.jsonl"
    return
  fi
  # shellcheck disable=SC2086
  if "$TIME" -v -o "$log.time" "$LLAMA_BENCH" -m "$g" -p "$PROMPT_TOKENS" -n "$NEW_TOKENS" -t "$THREADS" -r 1 \
      -o json $LLAMA_BENCH_ARGS >"$log.json" 2>"$log.log" \
    && "$LLAMA_BENCH" -m "$g" -p 0 -n 1 -t "$THREADS" -r 1 --no-warmup -o json -v $LLAMA_BENCH_ARGS \
      >"$log.load.json" 2>"$log.load.log"; then
    python3 - "$log" >>"$OUT/llamacpp-$t.jsonl" <<'EOF'
import json, re, sys
log = sys.argv[1]
tests = json.load(open(log + ".json"))
pp = next(t for t in tests if t["n_prompt"] > 0 and t["n_gen"] == 0)
tg = next(t for t in tests if t["n_gen"] > 0 and t["n_prompt"] == 0)
rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", open(log + ".time").read()).group(1)) * 1024
loads = re.findall(r"load time =\s*([\d.]+) ms", open(log + ".load.log", errors="replace").read())
probe = json.load(open(log + ".load.json"))
print(json.dumps({
    "prefill_tok_s": pp["avg_ts"], "decode_tok_s": tg["avg_ts"], "peak_rss_bytes": rss,
    "load_s": float(loads[0]) / 1e3 if loads else None, "first_decode_s": probe[0]["avg_ns"] / 1e9 if probe else None,
    "model_size": pp["model_size"], "n_params": pp["model_n_params"], "flash_attn": pp.get("flash_attn"),
}))
EOF
  else
    local l="$log.log"
    [ -s "$log.load.log" ] && l="$log.load.log"
    echo "  llama.cpp $t failed: $(err_line "$l")" >&2
    echo "{\"failed\": $(json_str "$(err_line "$l")")}" >>"$OUT/llamacpp-$t.jsonl"
  fi
}

echo "llmarch $MODEL vs llama.cpp $GGUF_DIR · $THREADS threads · $PROMPT_TOKENS-token prompt · $NEW_TOKENS new tokens" \
  "· types $TYPES · $ROUNDS interleaved rounds${MAX_CONTEXT:+ · llmarch --max-context $MAX_CONTEXT}" >&2
for r in $(seq 1 "$ROUNDS"); do
  for t in $TYPES; do
    echo "round $r/$ROUNDS $t (load $(cut -d' ' -f1-3 /proc/loadavg))" >&2
    run_llmarch "$t" "$r"
    run_llamacpp "$t" "$r"
  done
done

python3 - "$OUT" "$TYPES" "$MODEL" "$GGUF_DIR" "$THREADS" "$PROMPT_TOKENS" "$NEW_TOKENS" "$ROUNDS" <<'EOF'
import json, os, statistics, sys

out, types, model, gguf, threads, p, n, rounds = sys.argv[1:9]
types = types.split()

def load(name):
    path = os.path.join(out, name)
    return [json.loads(l) for l in open(path) if l.strip()] if os.path.exists(path) else []

def med(rows, key):
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else None

def f(x, fmt):
    return "—" if x is None else format(x, fmt)

def mb(x):
    return "—" if x is None else f"{x / 2**20:,.0f} MB"

def ratio(a, b):
    return "—" if a is None or b is None or b == 0 else f"{a / b:.2f}×"

print(f"\nllmarch `{model}` vs llama.cpp `{gguf}`: {threads} threads, {p}-token prompt + {n} new tokens, "
      f"medians of {rounds} interleaved round(s)\n")
print("| type | prefill tok/s llmarch / llama.cpp | ratio | decode tok/s llmarch / llama.cpp | ratio "
      "| peak RSS llmarch / llama.cpp | ratio | load s llmarch / llama.cpp |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
runs = []
for t in types:
    a_all, b_all = load(f"llmarch-{t}.jsonl"), load(f"llamacpp-{t}.jsonl")
    a = [r for r in a_all if "failed" not in r]
    b = [r for r in b_all if "failed" not in r]
    ap, bp = med(a, "prefill_tok_s"), med(b, "prefill_tok_s")
    ad, bd = med(a, "decode_tok_s"), med(b, "decode_tok_s")
    ar, br = med(a, "peak_rss_bytes"), med(b, "peak_rss_bytes")
    al, bl = med(a, "load_s"), med(b, "load_s")
    print(f"| {t} | {f(ap, '.1f')} / {f(bp, '.1f')} | **{ratio(ap, bp)}** | {f(ad, '.2f')} / {f(bd, '.2f')} | "
          f"**{ratio(ad, bd)}** | {mb(ar)} / {mb(br)} | {ratio(ar, br)} | {f(al, '.2f')} / {f(bl, '.2f')} |")
    for side, rows in (("llmarch", a_all), ("llama.cpp", b_all)):
        for i, r in enumerate(rows, 1):
            if "failed" in r:
                runs.append(f"- {t} {side} round {i}: FAILED: {r['failed']}")
            else:
                extra = f" (its first one-token decode {r['first_decode_s']:.2f} s)" if r.get("first_decode_s") is not None else ""
                runs.append(f"- {t} {side} round {i}: prefill {r['prefill_tok_s']:.1f}, decode {r['decode_tok_s']:.2f} tok/s, "
                            f"peak RSS {mb(r.get('peak_rss_bytes'))}, load {f(r.get('load_s'), '.2f')} s{extra}")
print("\nratio = llmarch / llama.cpp (prefill, decode: > 1 is llmarch faster; RSS: < 1 is llmarch smaller). "
      "llama.cpp load = its own `load time`: model load through its first one-token decode (see the script header).\n")
print("\n".join(runs))
EOF
