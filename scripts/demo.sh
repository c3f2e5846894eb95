#!/usr/bin/env bash
# The local demo: builds Palisade, then runs the walk-throughs of
# docs/walkthroughs/ (scripts/demo/walkthrough.py runs each ```sh block under
# a "# Walk-through" heading, file after file, in order): a control plane, two
# services (web and orders) with sidecars and join tokens, their identities,
# web's plaintext HTTP carried over mTLS to orders, and policy at work (default
# deny, an allowed call, a denied call with its explanation, a rate-limited
# call), then an API protected, a browser-facing API, refusals explained, a
# policy change previewed and the root CA rotated; last, README.md's taste.
# Everything runs on 127.0.0.1; state and logs live in ./demo-data (removed
# on start). At the end everything is stopped, unless --keep is given.
#
#   ./scripts/demo.sh           run it
#   ./scripts/demo.sh --keep    leave it running; print the exports for another shell (Ctrl-C stops it)
#   ./scripts/demo.sh --check   also compare every output with the docs' (exit 1 on a difference)
set -euo pipefail
cd "$(dirname "$0")/.."
for a in "$@"; do
  case "$a" in
    --keep|--check) ;;
    -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown argument $a (use --keep, --check or --help)" >&2; exit 64 ;;
  esac
done
if [ -z "${PALISADE_BIN_DIR:-}" ]; then
  cargo build --workspace --bins
fi
exec python3 scripts/demo/walkthrough.py "$@" docs/walkthroughs README.md
