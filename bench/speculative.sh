#!/usr/bin/env bash
# Speculative decoding on the CPU: what the machinery costs and what it would give.
#
#   1. examples/verify_cost (release): a verify pass over N+1 tokens (N = 1..8) against one decode
#      step at a 128-token context, each followed by its rollback, per weight type; and the
#      decode tok/s those times give at acceptance rates 0-100 % (the model is in the example's
#      header: a rejection costs nothing more where the cache is only rows, else a rollback
#      and a forward of the kept tokens).
#   2. `llmarch run` with and without `--draft ngram` on one prompt, greedy: the measured decode
#      tok/s, the acceptance rate, and a check that both generate the same ids.
#
# Random weights accept almost nothing a drafter proposes, so part 1 is what to read; part 2
# measures what prompt lookup gets on this model's own repetitions.
#
#   THREADS [2]  DTYPES ["f32 q8_0"]  NEW_TOKENS [96]  ROUNDS [3]  MODEL or $1 [/work/bench-model]
#   LLMARCH [target/release/llmarch]  VERIFY_COST [target/release/examples/verify_cost]
# Build first: cargo build --release --bin llmarch --example verify_cost
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-${MODEL:-/work/bench-model}}
THREADS=${THREADS:-2}
DTYPES=${DTYPES:-"f32 q8_0"}
NEW_TOKENS=${NEW_TOKENS:-96}
ROUNDS=${ROUNDS:-3}
TARGET=${CARGO_TARGET_DIR:-target}
LLMARCH=${LLMARCH:-$TARGET/release/llmarch}
VERIFY_COST=${VERIFY_COST:-$TARGET/release/examples/verify_cost}
export RAYON_NUM_THREADS=$THREADS CANDLE_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS
for bin in "$LLMARCH" "$VERIFY_COST"; do
  [ -x "$bin" ] || { echo "error: $bin not built (cargo build --release --bin llmarch --example verify_cost)" >&2; exit 1; }
done

for dtype in $DTYPES; do
  echo "== verify pass vs decode step: $dtype"
  "$VERIFY_COST" "$MODEL" --dtype "$dtype"
  echo
done

TMP=$(mktemp)
trap 'rm -f "$TMP"' EXIT
# A 64-token prompt of fixed ids (the same as bench/run.sh's shape).
PROMPT=$(python3 -c "print(','.join(str((i*7919+13)%1000+10) for i in range(64)))")
for dtype in $DTYPES; do
  echo "== ngram drafting, measured: $dtype, $NEW_TOKENS new tokens, greedy, median of $ROUNDS interleaved rounds"
  runs=()
  for r in $(seq "$ROUNDS"); do
    for k in 0 2 4; do
      draft=()
      [ "$k" = 0 ] || draft=(--draft ngram --draft-tokens "$k")
      runs+=("$k $("$LLMARCH" -q run "$MODEL" --dtype "$dtype" --prompt-ids "$PROMPT" -n "$NEW_TOKENS" --temperature 0 --json "${draft[@]}" | tail -n 1)")
    done
  done
  printf '%s\n' "${runs[@]}" >"$TMP"
  python3 - "$TMP" <<'PY'
import json, statistics, sys
by = {}
for line in open(sys.argv[1]):
    k, s = line.split(" ", 1)
    by.setdefault(int(k), []).append(json.loads(s))
plain = by.pop(0)
p_tok = statistics.median(r["decode_tok_s"] for r in plain)
for k, rs in sorted(by.items()):
    d = rs[0]
    tok = statistics.median(r["decode_tok_s"] for r in rs)
    same = "same ids" if all(r["generated_ids"] == plain[0]["generated_ids"] for r in rs) else "IDS DIFFER"
    print(f"  --draft-tokens {k}: decode {tok:.2f} tok/s vs {p_tok:.2f} plain ({tok / p_tok:.2f}x) · "
          f"accepted {d['accepted_tokens']}/{d['draft_tokens']} ({100 * d['acceptance_rate']:.0f}%) · "
          f"{d['target_steps']} target steps + {d['recomputed_tokens']} tokens fed again, for "
          f"{d['generated_tokens']} tokens (plain {plain[0]['target_steps']} steps) · {same}")
PY
done
