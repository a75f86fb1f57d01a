#!/usr/bin/env bash
# Installs a real etcd and builds kube-apiserver, kube-controller-manager, kube-scheduler and the
# kubelet (Debian's kubernetes 1.20 source package, all four in one build) for the operator's
# end-to-end tests and the real node. Idempotent; binaries are cached in ~/.cache/medmerge/k8s.
# Prints the path of the binary named by $1 (default kube-apiserver).
# Usage: scripts/setup-k8s.sh [kube-apiserver|kube-controller-manager|kube-scheduler|kubelet]
set -euo pipefail
want="${1:-kube-apiserver}"
case "$want" in kube-apiserver|kube-controller-manager|kube-scheduler|kubelet) ;; *) echo "setup-k8s: unknown binary $want" >&2; exit 2;; esac
CACHE="${MEDMERGE_CACHE:-$HOME/.cache/medmerge}/k8s"
mkdir -p "$CACHE"
# One build at a time: a second caller waits for the first instead of deleting its sources.
exec 9>"$CACHE/.lock"
flock 9
need=()
command -v etcd >/dev/null || need+=(etcd-server)
command -v go >/dev/null || need+=(golang-go)
command -v rsync >/dev/null || need+=(rsync)
command -v jq >/dev/null || need+=(jq)
# reflect2 1.0.1 (vendored by Kubernetes 1.20) crashes under Go >= 1.18 when the API server
# encodes object metadata; Debian's 1.0.2 is the upstream fix and replaces it in the build.
reflect2=/usr/share/gocode/src/github.com/modern-go/reflect2
[ -d "$reflect2" ] || need+=(golang-github-modern-go-reflect2-dev)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >&2
fi
# Binary names carry the patch level, so a cache from before the fix is rebuilt.
bin() { echo "$CACHE/$1-1.20.2-reflect2-1.0.2"; }
missing=()
for b in kube-apiserver kube-controller-manager kube-scheduler kubelet; do [ -x "$(bin "$b")" ] || missing+=("cmd/$b"); done
if [ ${#missing[@]} -gt 0 ]; then
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
  rm -rf vendor/github.com/modern-go/reflect2 && cp -r "$reflect2" vendor/github.com/modern-go/reflect2
  echo "setup-k8s: building ${missing[*]} (about 15 minutes on 2 cores, once)" >&2
  GOPATH="$PWD/.go" CGO_ENABLED=0 GOFLAGS=-mod=vendor make WHAT="${missing[*]}" >&2
  for m in "${missing[@]}"; do
    b="${m#cmd/}"
    cp "$(find _output -type f -name "$b" | head -n1)" "$(bin "$b").tmp"
    mv "$(bin "$b").tmp" "$(bin "$b")"
  done
  cd "$CACHE" && rm -rf "$SRC" "$CACHE/kube-apiserver"
  # The Go build cache is only needed for this one build.
  go clean -cache >/dev/null 2>&1 || true
fi
bin "$want"
