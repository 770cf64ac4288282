#!/usr/bin/env bash
# Set up (idempotent), then train the digits CNN with LSGD on 4 ranks in 2 groups of 2.
#   bash launch/quickstart.sh [EXAMPLE ARGS...]
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/launch/setup.sh"
exec bash "$ROOT/launch/mpirun.sh" 4 "$ROOT/examples/lsgd_digits.py" --group-size 2 "$@"
