#!/usr/bin/env bash
# README command (2): set up the environment if needed, then run the whole test suite in one process
# (importing seqio costs ~7 s, so one process) with 8 forced CPU devices (tests/conftest.py).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"
cd "$ROOT"
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=8"
exec python -m pytest -q --durations=10 tests "$@"
