#!/usr/bin/env bash
# Waits until the MergeJob CRD is Established. A just-created CRD has no conditions yet, and
# `kubectl wait` fails on that instead of waiting, so it is retried.
set -euo pipefail
for _ in $(seq 1 120); do kubectl wait --for condition=established --timeout=60s crd/mergejobs.medmerge.io >/dev/null 2>&1 && exit 0; sleep 0.5; done
kubectl wait --for condition=established --timeout=5s crd/mergejobs.medmerge.io
