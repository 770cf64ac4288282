#!/usr/bin/env bash
# Set up (idempotent), then compare data-parallel SGD with the methods the benchmarks show best,
# on MNIST-1D's wide MLP (4.1M parameters: a 16 MB exchange), the same training-time budget
# each, in one launch (python -m horovod_leader.compare), then one line per method and a plot.
#
# As root, where network namespaces can be made: on an emulated cluster of 2 nodes x 2 ranks
# joined by links of LINK_RATE (launch/emulated_cluster.sh), where communication costs what it
# costs on a cluster. Elsewhere: one node of 4 ranks over shared memory, in 2 groups of 2,
# and it says so. Without Horovod (a set-up with HOROVOD_LEADER_SKIP_HOROVOD=1, or whose Horovod
# build failed) the same runs on the torch.distributed engine, launched by torchrun.
#   bash launch/quickstart.sh
# Environment: BUDGET (seconds of training per method, default 15), EVAL_EVERY (seconds of
# training between evaluations, default 1.5), LINK_RATE (default 100mbit), EMULATE (auto, yes
# or no; default auto), OUT (default runs/quickstart), METHODS (default below: each an --algo
# value with its own options).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/launch/setup.sh"
PY=$ROOT/.venv/bin/python
BUDGET=${BUDGET:-15}
EVAL_EVERY=${EVAL_EVERY:-1.5}
LINK_RATE=${LINK_RATE:-100mbit}
EMULATE=${EMULATE:-auto}
OUT=${OUT:-$ROOT/runs/quickstart}
if [ -n "${METHODS:-}" ]; then read -r -a CHOSEN <<<"$METHODS"; else CHOSEN=(dp lsgd mgrawa localsgd); fi
say() { echo "[quickstart] $*"; }
START=$SECONDS

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
    WHERE="2 emulated nodes x 2 ranks, links of $LINK_RATE"
else
    WHERE="one node of 4 ranks over shared memory"
    say "no emulated cluster: $REASON. Falling back to $WHERE, in 2 groups of 2."
    say "Over shared memory communication is almost free, so this run cannot show what the methods save on a slow network."
fi

say "Comparing ${CHOSEN[*]} on MNIST-1D (wide MLP) on $WHERE: ${BUDGET} s of training each"
say "(evaluation excluded), --preset paper; every method's curve is its centre (the workers' average)."
"$PY" -c "from horovod_leader.training import data; data.load('mnist1d')"  # generated once, then cached

rm -rf "$OUT"
ARGS=(-m horovod_leader.compare --methods "${CHOSEN[@]}" --out "$OUT" --preset paper --dataset mnist1d --model mlp
      --time-budget "$BUDGET" --eval-every "$EVAL_EVERY" --eval-subset 2000 --checkpoint-every 0 --no-progress)
if "$PY" -c "import horovod.torch" 2>/dev/null; then
    LAUNCHER=mpirun
else  # a set-up without Horovod: the torch.distributed engine, started by torchrun
    LAUNCHER=torchrun
    say "Horovod is not installed: running on the torch.distributed engine, launched by torchrun."
fi
if [ -z "$REASON" ]; then
    EMULATED_LAUNCHER=$LAUNCHER LINK_RATE=$LINK_RATE bash "$ROOT/launch/emulated_cluster.sh" 2 2 "${ARGS[@]}"
elif [ "$LAUNCHER" = torchrun ]; then
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$ROOT/.venv/bin/torchrun" --standalone --nproc-per-node 4 "${ARGS[@]}" \
        --group-size 2
else
    bash "$ROOT/launch/mpirun.sh" 4 "${ARGS[@]}" --group-size 2
fi
RUNS=()
for method in "${CHOSEN[@]}"; do
    name=$("$PY" -c "import shlex, sys; from horovod_leader.training.compare import run_name; print(run_name(shlex.split(sys.argv[1])))" "$method")
    rm -rf "$OUT/$name/checkpoints"
    RUNS+=("$OUT/$name")
done
"$PY" - "$WHERE" "${RUNS[@]}" <<'EOF'
import json
import subprocess
import sys
from pathlib import Path

from horovod_leader.training.report import curve, load_run

where, folders = sys.argv[1], [Path(f) for f in sys.argv[2:]]
runs = [load_run(folder) for folder in folders]
target = curve(runs[0])[-1][1]  # data-parallel SGD's accuracy at the budget
out = folders[0].parent / "report"
subprocess.run([sys.executable, "-m", "horovod_leader.report", *map(str, folders), "--target", f"{target:.4f}",
                "--out", str(out), "--title", f"MNIST-1D, 4 workers, {where}"], check=True, capture_output=True)
print(f"\nOn {where}; the target is {runs[0]['name']}'s accuracy at the budget, {100 * target:.1f}%.")
for run, folder in zip(runs, folders):
    pts, last = curve(run), run["records"][-1]
    reached = next((t for t, a in pts if a >= target), None)
    steps_per_s = last["step"] / last["train_seconds"]
    links = [json.loads(p.read_text()) for p in sorted((folder / "links").glob("*.json"))]
    link = (f"{sum(l['train']['tx'] for l in links) / len(links) / last['step'] / 1e6:6.2f} MB/step on each link"
            if links and where.startswith("2 emulated") else "no link (shared memory)")
    print(f"  {run['name']:18s} accuracy {100 * pts[-1][1]:5.1f}% at {last['train_seconds']:4.1f} s, "
          f"target {'not reached' if reached is None else f'reached at {reached:4.1f} s'}, "
          f"{steps_per_s:5.2f} steps/s, {link}")
print(f"plot: {out / 'test_accuracy_vs_time.png'}  (table: {out / 'report.md'})")
EOF
say "done in $((SECONDS - START)) s (set-up included)."
