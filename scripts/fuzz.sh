#!/usr/bin/env bash
# Runs every fuzz target on its committed corpus for FUZZ_SECONDS each (20 by
# default): the CI smoke run. Longer runs: see fuzz/README.md.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${FUZZ_SECONDS:-20}"
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi
# cargo fuzz passes nightly-only sanitizer flags; the stable toolchain takes them so.
export RUSTC_BOOTSTRAP=1
cargo fuzz build -O
failed=0
passed=0
for target in $(cargo fuzz list); do
  # A scratch copy of the corpus: new inputs found in CI are not written into the checkout.
  scratch="$(mktemp -d)"
  cp -r "corpus/$target/." "$scratch/"
  if cargo fuzz run -O "$target" "$scratch" -- -max_total_time="$seconds" -rss_limit_mb=2048 >"$scratch.log" 2>&1; then
    echo "fuzz $target: $(grep -Eo 'Done [0-9]+ runs' "$scratch.log" | tail -1) in ${seconds}s, no crash"
    passed=$((passed + 1))
  else
    echo "fuzz $target: FAILED"; tail -40 "$scratch.log"
    failed=$((failed + 1))
  fi
  rm -rf "$scratch" "$scratch.log"
done
echo "fuzz: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
