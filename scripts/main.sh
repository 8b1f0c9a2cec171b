#!/usr/bin/env bash
# README command (1): a main job on 2 CPU cores; sets up the environment if needed; rerun to
# resume a killed run. Extra arguments go to the `rest-jax` command.
#
#   bash scripts/main.sh            the ReST loop on the embedded LibreOffice help corpus (German ->
#                                   English): shipped BC policy -> Grow 1 -> reward model -> Improve
#                                   0..3 -> Grow 2 -> Improve 0..3, every stage evaluated, best-of-N,
#                                   report; in $WORKDIR (./workdir). E.g. --gin.rest.bc_params_file=None
#                                   trains the BC policy first.
#   bash scripts/main.sh rest-em    ReST-EM on arithmetic_chain: shipped base model -> 3 x (E-step ->
#                                   verifier -> M-step from the base model), every iterate evaluated
#                                   (pass@1, pass@k, maj@k), the three controls, report; in $WORKDIR
#                                   (./workdir_rest_em).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"
cd "$ROOT"
if [ "${1:-}" = "rest-em" ]; then
  shift
  WORKDIR="${WORKDIR:-workdir_rest_em}"
  exec rest-jax rest-em --gin_file=gin_configs/runs/rest_em_arithmetic_cpu.gin --workdir="$WORKDIR" "$@"
fi
WORKDIR="${WORKDIR:-workdir}"
rest-jax rest --gin_file=gin_configs/runs/rest_libreoffice_de_en_cpu.gin --workdir="$WORKDIR" "$@"
