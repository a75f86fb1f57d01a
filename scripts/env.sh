# Sourced by the Makefile and CI: where the cached toolchain pieces live.
# Everything heavy is cached outside the clone so a second run is fast.
export MEDMERGE_CACHE="${MEDMERGE_CACHE:-$HOME/.cache/medmerge}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$MEDMERGE_CACHE/target}"
export LIBTORCH_USE_PYTORCH=1
# Incremental caches of every feature set and checkout grow without bound on a CI machine.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
export PATH="$MEDMERGE_CACHE/venv/bin:$PATH"
_torch_lib="$(ls -d "$MEDMERGE_CACHE"/venv/lib/python3*/site-packages/torch/lib 2>/dev/null | head -n1)"
export LD_LIBRARY_PATH="${_torch_lib}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
unset _torch_lib
# No S3 client of a test or script may ask the cloud metadata address for credentials.
export AWS_EC2_METADATA_DISABLED=true
