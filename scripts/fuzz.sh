#!/usr/bin/env bash
# Fuzz the parsers that read untrusted bytes (tests/fuzz.rs) for SECONDS (default 300) with a
# fresh seed, and keep what crashes under tests/fuzz/ as regression inputs that `cargo test`
# replays. Not part of .ci/run: run it after touching a parser.
#   scripts/fuzz.sh [SECONDS] [SEED]
set -uo pipefail
cd "$(dirname "$0")/.."
secs="${1:-300}"
seed="${2:-$(date +%s)}"
rm -f target/fuzz-crash-* target/fuzz-last-input.*
echo "fuzzing for ${secs}s, seed ${seed}"
LLMARCH_FUZZ_SECS="$secs" LLMARCH_FUZZ_SEED="$seed" \
    cargo test --test fuzz mutated_inputs_never_panic -- --nocapture
status=$?
kept=0
for f in target/fuzz-crash-*; do
    [ -e "$f" ] || continue
    name="$(basename "$f" | sed 's/^fuzz-crash-//')-seed${seed}"
    cp "$f" "tests/fuzz/$name"
    kept=$((kept + 1))
done
# Ended by a signal (an abort: an allocation no bound stopped): the input running then is the
# newest of the last-input files.
if [ "$status" -gt 128 ] || { [ "$status" -ne 0 ] && [ "$kept" -eq 0 ]; }; then
    last="$(ls -t target/fuzz-last-input.* 2>/dev/null | head -1)"
    if [ -n "$last" ]; then
        cp "$last" "tests/fuzz/$(basename "$last" | sed 's/^fuzz-last-input\.//')-abort-seed${seed}"
        kept=$((kept + 1))
    fi
fi
echo "exit ${status}; ${kept} input(s) kept under tests/fuzz/"
exit "$status"
