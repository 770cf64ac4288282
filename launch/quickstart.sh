#!/usr/bin/env bash
# Set up (idempotent), then compare LSGD with data-parallel SGD, EASGD and MGRAWA on MNIST-1D's
# wide MLP (4.1M parameters: a 16 MB exchange), the same training-time budget each, then the report.
#
# As root, where network namespaces can be made: on an emulated cluster of 2 nodes x 2 ranks
# joined by 1 Gbit/s links (launch/emulated_cluster.sh), where communication costs what it
# costs on a cluster. Elsewhere: one node of 4 ranks over shared memory, in 2 groups of 2,
# and it says so.
#   bash launch/quickstart.sh
# Environment: BUDGET (seconds of training per method, default 20), EVAL_EVERY (seconds of
# training between evaluations, default 5), LINK_RATE (default 1gbit), EMULATE (auto, yes or
# no; default auto), OUT (default runs/quickstart).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/launch/setup.sh"
PY=$ROOT/.venv/bin/python
BUDGET=${BUDGET:-20}
EVAL_EVERY=${EVAL_EVERY:-5}
LINK_RATE=${LINK_RATE:-1gbit}
EMULATE=${EMULATE:-auto}
OUT=${OUT:-$ROOT/runs/quickstart}
METHODS=(lsgd dp easgd mgrawa)
say() { echo "[quickstart] $*"; }

# Why the emulated cluster cannot run here (empty: it can).
why_not_emulated() {
    [ "$(id -u)" = 0 ] || { echo "not root (the emulated cluster creates network namespaces, links and a bridge)"; return; }
    local tool
    for tool in ip tc unshare; do command -v "$tool" >/dev/null || { echo "'$tool' is not installed"; return; }; done
    local probe=hl-quickstart-probe-$$
    ip netns add "$probe" 2>/dev/null || { echo "network namespaces cannot be made here"; return; }
    ip netns del "$probe"
}

case "$EMULATE" in
    auto) REASON=$(why_not_emulated) ;;
    yes) REASON="" ;;
    no) REASON="EMULATE=no" ;;
    *) echo "EMULATE must be auto, yes or no, got '$EMULATE'" >&2; exit 2 ;;
esac
if [ -z "$REASON" ]; then
    WHERE="an emulated cluster of 2 nodes x 2 ranks, links of $LINK_RATE each way (no added latency; one machine's CPU serves both nodes)"
else
    WHERE="one node of 4 ranks over shared memory, in 2 groups of 2"
    say "no emulated cluster: $REASON. Falling back to $WHERE."
    say "Over shared memory communication is almost free, so this run cannot show what LSGD saves on a slow network."
fi

say "Comparing LSGD, data-parallel SGD, EASGD and MGRAWA on MNIST-1D (wide MLP) on $WHERE,"
say "${BUDGET} s of training each (evaluation excluded), --preset paper (lr 0.1, momentum 0.9 Nesterov, batch 128 per worker)."
say "Periods: LSGD averages toward its node's leader every tau=4 steps and toward the global leader every"
say "tau_G=16 steps (the only exchange that crosses the links); EASGD tau=16 (equal to LSGD's tau_G);"
say "MGRAWA tau=32 (its paper's); data-parallel SGD all-reduces the gradients every step."
say "MNIST-1D: generated once and cached (about 12 s the first time)."
"$PY" -c "from horovod_leader.training import data; data.load('mnist1d')"

rm -rf "$OUT"
COMMON=(-m horovod_leader.train --preset paper --dataset mnist1d --model mlp --time-budget "$BUDGET"
        --eval-every "$EVAL_EVERY" --checkpoint-every 0 --no-progress)
for algo in "${METHODS[@]}"; do
    say "== $algo"
    if [ -z "$REASON" ]; then
        LINK_RATE=$LINK_RATE bash "$ROOT/launch/emulated_cluster.sh" 2 2 "${COMMON[@]}" --algo "$algo" --out "$OUT/$algo"
    else
        bash "$ROOT/launch/mpirun.sh" 4 "${COMMON[@]}" --group-size 2 --algo "$algo" --out "$OUT/$algo"
    fi
    rm -rf "$OUT/$algo/checkpoints"
done

# The target: data-parallel SGD's final accuracy, so that the time column reads "time to reach
# what data-parallel SGD reached in its budget".
TARGET=$("$PY" - "$OUT/dp" <<'EOF'
import sys
from pathlib import Path
from horovod_leader.training.report import accuracy_of, load_run
print(f"{accuracy_of(load_run(Path(sys.argv[1]))['records'][-1]):.4f}")
EOF
)
RUNS=()
for algo in "${METHODS[@]}"; do RUNS+=("$OUT/$algo"); done
"$PY" -m horovod_leader.report "${RUNS[@]}" --target "$TARGET" --out "$OUT/report"
"$PY" - "$OUT/report/summary.json" "$TARGET" "$WHERE" <<'EOF'
import json, sys
summaries, target, where = json.load(open(sys.argv[1])), float(sys.argv[2]), sys.argv[3]
print(f"\nOn {where}: the target {target:.4f} is data-parallel SGD's final accuracy.")
for s in summaries:
    reached = "not reached" if s["time_to_target_s"] is None else f"reached at {s['time_to_target_s']:.1f} s"
    final = "-" if s["final_accuracy"] is None else f"{s['final_accuracy']:.4f}"
    print(f"  {s['method']:7s} {s['steps_per_s']:6.1f} steps/s, {s['bytes_per_step'] / 1e6:6.2f} MB/step/worker, "
          f"final accuracy {final} ({s['curve_of']}) after {s['train_seconds']:.1f} s of training, target {reached}")
print("A synchronous run checks the budget every tau steps (data-parallel SGD every 10), so it may train "
      "slightly past it: the seconds above are what each one used.")
EOF
