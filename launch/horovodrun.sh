#!/usr/bin/env bash
# Launch a horovod_leader program with horovodrun.
#   launch/horovodrun.sh NP PROGRAM [ARGS...]                       one node
#   HOSTS=host1:4,host2:4 launch/horovodrun.sh 8 PROGRAM [ARGS...]   several nodes (groups = nodes)
#   GLOO=1 launch/horovodrun.sh NP PROGRAM [ARGS...]                 Horovod's Gloo mode (no MPI)
# PROGRAM is a script path or "-m module". HOROVODRUN_EXTRA: more horovodrun flags (e.g.
# "--network-interface eth1 --ssh-identity-file KEY"). DRY_RUN=1 prints the command instead
# of running it.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 NP PROGRAM [ARGS...]" >&2; exit 2; }
NP=$1; shift
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=python3
HVDRUN=${HOROVODRUN:-$(dirname "$PY")/horovodrun}
[ -x "$HVDRUN" ] || HVDRUN=horovodrun
CMD=("$HVDRUN" -np "$NP")
[ -n "${HOSTS:-}" ] && CMD+=(-H "$HOSTS")
[ "${GLOO:-0}" = 1 ] && CMD+=(--gloo)
# shellcheck disable=SC2206
[ -n "${HOROVODRUN_EXTRA:-}" ] && CMD+=($HOROVODRUN_EXTRA)
CMD+=("$PY" "$@")
if [ "${DRY_RUN:-0}" = 1 ]; then printf '%s ' "${CMD[@]}"; echo; exit 0; fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "${CMD[@]}"
