#!/usr/bin/env bash
# Installs what the real single-node Kubernetes of the end-to-end tests runs on: containerd,
# runc, the CNI plugins and catatonit (the pause process) from Debian, and the four Kubernetes
# binaries built from Debian's source (scripts/setup-k8s.sh, cached). Idempotent.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
need=()
command -v containerd >/dev/null || need+=(containerd)
command -v runc >/dev/null || need+=(runc)
[ -x /usr/lib/cni/bridge ] || need+=(containernetworking-plugins)
command -v catatonit >/dev/null || need+=(catatonit)
command -v iptables >/dev/null || need+=(iptables)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
fi
for b in kube-apiserver kube-controller-manager kube-scheduler kubelet; do "$here/setup-k8s.sh" "$b" >/dev/null; done
