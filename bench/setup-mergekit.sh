#!/usr/bin/env bash
# Installs mergekit (PyPI) for the merge benchmark into its own venv in ~/.cache/medmerge, reusing
# the project venv's torch through a .pth file so nothing is downloaded twice and the project venv
# is left as scripts/setup.sh made it. Idempotent; prints the mergekit-pytorch path.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
VERSION=0.1.5
VENV="$MEDMERGE_CACHE/mergekit-venv"
if ! "$VENV/bin/python" -c "import mergekit, sys; sys.exit(0 if __import__('importlib.metadata').metadata.version('mergekit') == '$VERSION' else 1)" 2>/dev/null; then
  python3 -m venv "$VENV"
  torch_site=$("$MEDMERGE_CACHE/venv/bin/python" -c "import site; print(site.getsitepackages()[0])")
  own_site=$("$VENV/bin/python" -c "import site; print(site.getsitepackages()[0])")
  echo "$torch_site" > "$own_site/medmerge-torch.pth"
  "$VENV/bin/pip" install -q "mergekit==$VERSION" >&2
fi
echo "$VENV/bin/mergekit-pytorch"
