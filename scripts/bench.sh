#!/usr/bin/env bash
# Builds release binaries and runs palisade-bench (direct vs mesh, one run).
# Run on a quiet machine. Arguments go to palisade-bench, e.g. --json bench.json.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace --bins
exec target/release/palisade-bench "$@"
