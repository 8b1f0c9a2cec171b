#!/usr/bin/env bash
# Creates the launcher's own virtual environment, xm_launch/.venv, from xm_launch/requirements.txt
# (xmanager and exact pins; it needs protobuf<7, the main environment pins 7.x). Idempotent: a no-op
# when the environment was built from the same requirements (sha256 stamp in the venv).
#   bash xm_launch/env.sh && xm_launch/.venv/bin/python xm_launch/launch.py --dry_run ...
# Measured on 2 shared CPU cores with PyPI reachable: about 1.5 minutes the first time.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${XM_LAUNCH_VENV:-$HERE/.venv}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
PIP_VERSION=26.3  # pip 23's resolver backtracked for minutes over google-cloud-aiplatform's tree.
STAMP="$VENV/.xm_launch_requirements.sha256"
WANT="$( (cat "$HERE/requirements.txt"; echo "pip==$PIP_VERSION") | sha256sum | cut -d' ' -f1)"
if [ -x "$VENV/bin/python" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$WANT" ]; then
  exit 0
fi
echo "[xm_launch] creating $VENV from xm_launch/requirements.txt" >&2
start=$(date +%s)
rm -rf "$VENV"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "pip==$PIP_VERSION" >&2
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$HERE/requirements.txt" 2>&1 \
  | grep -v "is ignored: it is neither a file nor a directory" >&2 || true
"$VENV/bin/python" -c "from xmanager import xm, xm_local; from absl import app, flags" \
  || { echo "[xm_launch] install failed: see pip output above" >&2; exit 1; }
echo "$WANT" > "$STAMP"
echo "[xm_launch] ready in $(( $(date +%s) - start )) s" >&2
