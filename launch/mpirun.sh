#!/usr/bin/env bash
# Launch a horovod_leader program with mpirun, with the flags a cluster needs.
#   launch/mpirun.sh NP PROGRAM [ARGS...]
# Environment:
#   HOSTS            mpirun host list, e.g. "node1:4,node2:4" (default: this machine)
#   MPIRUN_EXTRA     more mpirun flags (e.g. "--mca btl_tcp_if_include ib0")
#   BIND_TO          process binding (default: socket; none when oversubscribing)
#   OMP_NUM_THREADS  threads per rank (default 1)
#   DRY_RUN=1        print the command instead of running it
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 NP PROGRAM [ARGS...]" >&2; exit 2; }
NP=$1; shift
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=python3
OVERSUBSCRIBE=0
# More ranks than cores (a laptop, CI) needs oversubscription; a cluster allocation does not.
if [ -z "${HOSTS:-}" ] && [ "$NP" -gt "$(nproc)" ]; then OVERSUBSCRIBE=1; fi
BIND_TO=${BIND_TO:-$([ "$OVERSUBSCRIBE" = 1 ] && echo none || echo socket)}
CMD=(mpirun -np "$NP" --map-by slot --bind-to "$BIND_TO" -x "OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}" -x PATH)
# Forward the variables the ranks need on other nodes, when they are set here.
for var in LD_LIBRARY_PATH HOROVOD_LEADER_GROUP_SIZE PYTHONPATH; do [ -n "${!var:-}" ] && CMD+=(-x "$var"); done
[ -n "${HOSTS:-}" ] && CMD+=(-H "$HOSTS")
# Open MPI refuses to run as root unless told; only say so when we are root.
[ "$(id -u)" = 0 ] && CMD+=(--allow-run-as-root)
[ "$OVERSUBSCRIBE" = 1 ] && CMD+=(--oversubscribe)
# shellcheck disable=SC2206
[ -n "${MPIRUN_EXTRA:-}" ] && CMD+=($MPIRUN_EXTRA)
CMD+=("$PY" "$@")
if [ "${DRY_RUN:-0}" = 1 ]; then printf '%s ' "${CMD[@]}"; echo; exit 0; fi
exec "${CMD[@]}"
