#!/usr/bin/env bash
# README command (1): the main job on the embedded default (LibreOffice help, German -> English).
# Sets up the environment if needed. Until the ReST loop lands (Grow -> score -> Improve), the main
# job trains the supervised (BC) policy ReST starts from, then evaluates it on dev and test.
# Extra arguments are passed to both commands (e.g. --gin.train.max_minutes=5).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"
cd "$ROOT"
WORKDIR="${WORKDIR:-workdir}"
rest-jax train --gin_file=gin_configs/runs/train_bc.gin --workdir="$WORKDIR" "$@"
rest-jax eval --gin_file=gin_configs/runs/train_bc.gin --workdir="$WORKDIR" "$@"
