#!/usr/bin/env bash
# Set up (idempotent), then compare LSGD with data-parallel SGD, EASGD and MGRAWA on the bundled
# digits data: 4 ranks in 2 groups of 2, the same wall-clock budget each, then the report.
#   bash launch/quickstart.sh            (BUDGET=seconds per method, default 20; OUT=runs/quickstart)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/launch/setup.sh"
BUDGET=${BUDGET:-20}
OUT=${OUT:-$ROOT/runs/quickstart}
rm -rf "$OUT"
for algo in lsgd dp easgd mgrawa; do
    echo "== $algo: 4 ranks, ${BUDGET} s"
    bash "$ROOT/launch/mpirun.sh" 4 -m horovod_leader.train --algo "$algo" --dataset digits --model cnn \
        --group-size 2 --time-budget "$BUDGET" --batch-size 32 --lr 0.05 --out "$OUT/$algo" --no-progress
done
"$ROOT/.venv/bin/python" -m horovod_leader.report "$OUT"/lsgd "$OUT"/dp "$OUT"/easgd "$OUT"/mgrawa --out "$OUT/report"
