#!/usr/bin/env bash
# Installs Debian's chromium (headless) for the report rendering test. Idempotent.
set -euo pipefail
if ! command -v chromium >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-dejavu-core >&2
fi
command -v chromium
