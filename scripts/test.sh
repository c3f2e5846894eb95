#!/usr/bin/env bash
# Runs the whole test suite: builds the binaries the end-to-end tests start,
# then every unit and end-to-end test. Root-only tests say when they skip.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --workspace --bins
cargo nextest run --workspace --no-fail-fast "$@"
