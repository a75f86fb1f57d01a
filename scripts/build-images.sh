#!/usr/bin/env bash
# Builds the operator and trainer (CPU) images from images/operator.Dockerfile and
# images/trainer.Dockerfile with images/assemble.py (no container engine runs here and base
# images cannot be pulled; see assemble.py), from this workspace's binaries, into docker-archive
# tarballs in $MEDMERGE_CACHE/images. Rebuilt only when a binary, the weights or a Dockerfile is
# newer than the tarball. Prints the two tarball paths (operator, trainer).
#
# The binaries are the workspace's dev-profile builds (the trainer and every dependency are
# compiled at opt-level 3 there, see Cargo.toml) with debug info stripped, not a second release
# build; the trainer's libtorch is the cached torch wheel's, the libraries the trainer links.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
out="$MEDMERGE_CACHE/images"
mkdir -p "$out"
bin="$CARGO_TARGET_DIR/debug"
for b in medmerge-operator medmerge-trainer; do
  [ -x "$bin/$b" ] || { echo "build-images: $bin/$b is missing: cargo build --workspace --bins" >&2; exit 1; }
done
torch_lib="$(ls -d "$MEDMERGE_CACHE"/venv/lib/python3*/site-packages/torch/lib | head -n1)"
weights="$MEDMERGE_CACHE/weights"
stale() { # tarball inputs...
  local tar=$1; shift
  [ -f "$tar" ] || return 0
  for f in "$@"; do [ "$f" -nt "$tar" ] && return 0; done
  return 1
}
# Dev-profile binaries carry debug info (hundreds of MiB); a release build has none.
stripped() { strip --strip-debug -o "$2" "$1"; }
operator_tar="$out/operator.tar"
if stale "$operator_tar" "$bin/medmerge-operator" images/operator.Dockerfile images/assemble.py; then
  stripped "$bin/medmerge-operator" "$out/medmerge-operator"
  python3 images/assemble.py images/operator.Dockerfile localhost/medmerge/operator:dev "$operator_tar" \
    --source /src/target/release/medmerge-operator="$out/medmerge-operator"
  rm -f "$out/medmerge-operator"
fi
trainer_tar="$out/trainer-cpu.tar"
if stale "$trainer_tar" "$bin/medmerge-trainer" images/trainer.Dockerfile images/assemble.py "$weights/efficientnet-lite0-imagenet.safetensors"; then
  # The Dockerfile's build stage gathers /out/{lib,weights,bin}; the same, from the caches.
  stage="$out/stage"
  rm -rf "$stage" && mkdir -p "$stage/lib" "$stage/bin"
  # The CPU variant's libtorch: the wheel's libraries the trainer links (the cached wheel is the
  # CUDA build; its CUDA kernels, cuBLAS and cuDNN are not linked by the trainer and stay out).
  # Symbolic links, so the libraries' own RUNPATHs ($ORIGIN/...) still resolve where they are.
  for so in $(LD_LIBRARY_PATH="$torch_lib" ldd "$bin/medmerge-trainer" | awk -v d="$torch_lib/" 'index($3, d) == 1 {print $3}'); do
    ln -s "$(readlink -f "$so")" "$stage/lib/$(basename "$so")"
  done
  stripped "$bin/medmerge-trainer" "$stage/bin/medmerge-trainer"
  python3 images/assemble.py images/trainer.Dockerfile localhost/medmerge/trainer:dev-cpu "$trainer_tar" \
    --source /out/lib="$stage/lib" --source /out/weights="$weights" --source /out/bin/medmerge-trainer="$stage/bin/medmerge-trainer"
  rm -rf "$stage"
fi
echo "$operator_tar"
echo "$trainer_tar"
