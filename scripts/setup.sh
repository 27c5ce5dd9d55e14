#!/usr/bin/env bash
# Sets up neve in ./.venv: Python venv, the CPU build of PyTorch first (so no multi-GB
# CUDA build is pulled), then neve with its extras. Idempotent; quiet when done already.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${NEVE_VENV:-.venv}
EXTRAS=${NEVE_EXTRAS:-dev}
TORCH_VERSION=${NEVE_TORCH_VERSION:-2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"

stamp="$VENV/.neve-setup-$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -c1-12)-$EXTRAS"
if [ -f "$stamp" ]; then
  exit 0
fi
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  echo "setup: installing torch==$TORCH_VERSION (CPU build)"
  python -m pip install -q "torch==$TORCH_VERSION"
fi
echo "setup: installing neve[$EXTRAS]"
python -m pip install -q -e ".[$EXTRAS]"
rm -f "$VENV"/.neve-setup-*
touch "$stamp"
echo "setup: done ($(python -c 'import sys; print(sys.version.split()[0])'), $VENV)"
