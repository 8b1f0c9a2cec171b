#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment from the pinned requirements.
# Sourced by scripts/main.sh and scripts/test.sh; safe to run again (a no-op when up to date).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${REST_JAX_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
STAMP="$VENV/.rest_jax_requirements.sha256"
WANT="$(cat "$ROOT/requirements.txt" "$ROOT/constraints.txt" "$ROOT/setup.py" | sha256sum | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "[env] creating $VENV from requirements.txt (first run takes ~3 min)" >&2
  start=$(date +%s)
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check -r "$ROOT/requirements.txt" -c "$ROOT/constraints.txt" 2>&1 \
    | grep -v "is ignored: it is neither a file nor a directory" >&2 || true
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps --no-build-isolation -e "$ROOT" >&2
  "$VENV/bin/python" -c "import jax, flax, optax, orbax.checkpoint, seqio, sacrebleu, gin" \
    || { echo "[env] install failed: see pip output above" >&2; exit 1; }
  echo "$WANT" > "$STAMP"
  echo "[env] ready in $(( $(date +%s) - start )) s" >&2
fi
export PATH="$VENV/bin:$PATH"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-3}"
