#!/usr/bin/env bash
# README command (1): the main job on the embedded default (LibreOffice help, German -> English):
# the whole ReST loop (shipped BC policy -> Grow 1 -> reward model -> Improve 0..3 -> Grow 2 ->
# Improve 0..3, every stage evaluated, best-of-N, report) on 2 CPU cores, in $WORKDIR (./workdir).
# Sets up the environment if needed. Rerun to resume a killed run. Extra arguments go to
# `rest-jax rest` (e.g. --gin.rest.bc_params_file=None to train the BC policy first).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"
cd "$ROOT"
WORKDIR="${WORKDIR:-workdir}"
rest-jax rest --gin_file=gin_configs/runs/rest_libreoffice_de_en_cpu.gin --workdir="$WORKDIR" "$@"
