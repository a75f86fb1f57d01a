#!/usr/bin/env bash
# Deletes superseded executables from the shared cargo target directory: every rebuild of a test
# or binary leaves the previous one (hundreds of MB each, with debug info) under another hash,
# and the cache in ~/.cache/medmerge would otherwise grow with every run until the disk is full.
# Keeps the newest two executables of each name: a package's library and binary unit tests share
# a name, and both are current.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
deps="$CARGO_TARGET_DIR/debug/deps"
[ -d "$deps" ] || exit 0
find "$deps" -maxdepth 1 -type f -executable -printf '%T@ %f\n' | sort -rn | awk '
  { name = $2; sub(/-[0-9a-f]+$/, "", name); if (seen[name]++ >= 2) print $2 }' |
  while read -r stale; do rm -f "$deps/$stale"; done
rm -rf "$CARGO_TARGET_DIR/debug/incremental"
