#!/usr/bin/env bash
# Refreshes the pinned advisory snapshot from a checkout of the RustSec
# advisory database: ./scripts/refresh-advisories.sh /path/to/advisory-db
# It keeps the advisories of every crate in Cargo.lock and fuzz/Cargo.lock,
# and records which commit and which crates it covered.
set -euo pipefail
src="${1:?usage: refresh-advisories.sh /path/to/advisory-db checkout}"
cd "$(dirname "$0")/.."
out=security/advisory-db
rm -rf "$out/crates"
mkdir -p "$out/crates"
grep -h '^name = ' Cargo.lock fuzz/Cargo.lock | sed 's/name = "\(.*\)"/\1/' | sort -u >"$out/CRATES"
while read -r c; do
  if [ -d "$src/crates/$c" ]; then cp -r "$src/crates/$c" "$out/crates/"; fi
done <"$out/CRATES"
cp "$src/LICENSE.txt" "$out/"
git -C "$src" log -1 --format='%H %cI' >"$out/SNAPSHOT"
echo "snapshot $(cat "$out/SNAPSHOT"): $(ls "$out/crates" | wc -l) of $(wc -l <"$out/CRATES") crates have advisories"
