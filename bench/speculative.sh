#!/usr/bin/env bash
# Speculative decoding on the CPU: what the machinery costs and what it would give.
#
#   1. examples/verify_cost (release): a verify pass over N+1 tokens (N = 1..8) against one decode
#      step at a 128-token context, each followed by its rollback, per weight type; and the
#      decode tok/s those times give at acceptance rates 0-100 % (the model is in the example's
#      header: a rejection costs a rollback and a forward of the kept tokens).
#   2. `llmarch run` with and without `--draft ngram` on one prompt, greedy: the measured decode
#      tok/s, the acceptance rate, and a check that both generate the same ids.
#
# Random weights accept almost nothing a drafter proposes, so part 1 is what to read; part 2
# measures what prompt lookup gets on this model's own repetitions.
#
#   THREADS [2]  DTYPES ["f32 q8_0"]  NEW_TOKENS [96]  MODEL or $1 [/work/bench-model]
#   LLMARCH [target/release/llmarch]  VERIFY_COST [target/release/examples/verify_cost]
# Build first: cargo build --release --bin llmarch --example verify_cost
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-${MODEL:-/work/bench-model}}
THREADS=${THREADS:-2}
DTYPES=${DTYPES:-"f32 q8_0"}
NEW_TOKENS=${NEW_TOKENS:-96}
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

# A 64-token prompt of fixed ids (the same as bench/run.sh's shape).
PROMPT=$(python3 -c "print(','.join(str((i*7919+13)%1000+10) for i in range(64)))")
for dtype in $DTYPES; do
  echo "== ngram drafting, measured: $dtype, $NEW_TOKENS new tokens, greedy"
  plain=$("$LLMARCH" -q run "$MODEL" --dtype "$dtype" --prompt-ids "$PROMPT" -n "$NEW_TOKENS" --temperature 0 --json | tail -n 1)
  for k in 2 4; do
    drafted=$("$LLMARCH" -q run "$MODEL" --dtype "$dtype" --prompt-ids "$PROMPT" -n "$NEW_TOKENS" --temperature 0 --json --draft ngram --draft-tokens "$k" | tail -n 1)
    python3 - "$plain" "$drafted" "$k" <<'PY'
import json, sys
p, d, k = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
same = "same ids" if p["generated_ids"] == d["generated_ids"] else "IDS DIFFER"
print(f"  --draft-tokens {k}: decode {d['decode_tok_s']:.2f} tok/s vs {p['decode_tok_s']:.2f} plain "
      f"({d['decode_tok_s'] / p['decode_tok_s']:.2f}x) · accepted {d['accepted_tokens']}/{d['draft_tokens']} "
      f"({100 * d['acceptance_rate']:.0f}%) · {d['target_steps']} target steps for {d['generated_tokens']} tokens "
      f"(plain {p['target_steps']}) · {same}")
PY
  done
done
