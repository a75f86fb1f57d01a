#!/usr/bin/env bash
# Installs a real etcd and builds kube-apiserver (Debian's kubernetes 1.20 source package) for
# the operator's end-to-end tests. Idempotent; the binary is cached in ~/.cache/medmerge/k8s.
set -euo pipefail
CACHE="${MEDMERGE_CACHE:-$HOME/.cache/medmerge}/k8s"
mkdir -p "$CACHE"
need=()
command -v etcd >/dev/null || need+=(etcd-server)
command -v go >/dev/null || need+=(golang-go)
command -v rsync >/dev/null || need+=(rsync)
command -v jq >/dev/null || need+=(jq)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >&2
fi
if [ ! -x "$CACHE/kube-apiserver" ]; then
  if ! grep -rqs "deb-src" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    # Same signing key as the deb822 source the image ships, or apt refuses the conflict.
    printf 'Types: deb-src\nURIs: http://deb.debian.org/debian\nSuites: bookworm\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
      > /etc/apt/sources.list.d/medmerge-src.sources
    apt-get update -qq
  fi
  SRC="$CACHE/src"
  rm -rf "$SRC" && mkdir -p "$SRC" && cd "$SRC"
  apt-get source --download-only kubernetes >&2
  tar xf kubernetes_*.orig.tar.* && dir=$(find . -maxdepth 1 -type d -name 'kubernetes-*' | head -n1) && cd "$dir"
  mkdir -p .go/src/k8s.io && ln -sfn ../../.. .go/src/k8s.io/kubernetes
  echo "setup-k8s: building kube-apiserver (about 10 minutes, once)" >&2
  GOPATH="$PWD/.go" CGO_ENABLED=0 GOFLAGS=-mod=vendor make WHAT=cmd/kube-apiserver >&2
  cp "$(find _output -type f -name kube-apiserver | head -n1)" "$CACHE/kube-apiserver.tmp"
  mv "$CACHE/kube-apiserver.tmp" "$CACHE/kube-apiserver"
  cd "$CACHE" && rm -rf "$SRC"
fi
echo "$CACHE/kube-apiserver"
