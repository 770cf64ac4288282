#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite: unit tests and the 4-rank MPI tests.
#   bash launch/test.sh [PYTEST ARGS...]
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/launch/setup.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest "$@"
