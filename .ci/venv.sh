#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install nnsynth into it.
# Usage: source .ci/venv.sh [extra]   -> sets $PY to the venv's python
# torch is pinned to the build this project is tested with; pip's constraints on this machine
# install it from local disk.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${NNSYNTH_VENV:-$REPO/.venv}"
EXTRA="${1:-}"
PY_BOOT="${PYTHON:-python3}"
STAMP="$VENV/.nnsynth-installed"
WANT="$(cat "$REPO/setup.py" | sha1sum | cut -c1-16)${EXTRA}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[nnsynth] creating virtual environment $VENV"
  "$PY_BOOT" -m venv "$VENV"
fi
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "[nnsynth] installing torch and nnsynth into $VENV (a few minutes the first time)"
  "$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -m pip install -q torch==2.14.1 torchvision==0.29.1 2>&1 | grep -v "^WARNING: Location" || true
  if [ -n "$EXTRA" ]; then TARGET="$REPO[$EXTRA]"; else TARGET="$REPO"; fi
  "$VENV/bin/python" -m pip install -q -e "$TARGET" 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -c "import nnsynth, torch, SimpleITK, blosc2" || { echo "[nnsynth] installation failed"; exit 1; }
  echo "$WANT" > "$STAMP"
fi
PY="$VENV/bin/python"
export PATH="$VENV/bin:$PATH"
