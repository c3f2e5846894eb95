#!/usr/bin/env bash
# Checks Cargo.lock (and fuzz/Cargo.lock) against the RustSec advisories
# offline, from the pinned snapshot in security/advisory-db (see its README).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! cargo audit --version >/dev/null 2>&1; then
  cargo install cargo-audit --locked
fi
# cargo-audit reads its database from a git repository: make one from the snapshot.
db="$(mktemp -d)"
trap 'rm -rf "$db"' EXIT
cp -r security/advisory-db/. "$db/"
git -C "$db" init -q
git -C "$db" -c user.name=palisade -c user.email=ci@palisade.invalid add -A
git -C "$db" -c user.name=palisade -c user.email=ci@palisade.invalid commit -qm snapshot
# Every crate in the locks must have been considered when the snapshot was taken.
missing=$(comm -23 <(grep -h '^name = ' Cargo.lock fuzz/Cargo.lock | sed 's/name = "\(.*\)"/\1/' | sort -u) \
  <(sort -u security/advisory-db/CRATES))
if [ -n "$missing" ]; then
  echo "audit: crates not covered by the advisory snapshot (refresh it, see security/advisory-db/README.md):"
  echo "$missing"
  exit 1
fi
for lock in Cargo.lock fuzz/Cargo.lock; do
  echo "audit: $lock"
  cargo audit --db "$db" --no-fetch --stale --deny warnings \
    $(sed -n 's/^ignore: \(RUSTSEC-[0-9-]*\).*/--ignore \1/p' security/advisory-db/IGNORED) \
    -f "$lock"
done
