#!/usr/bin/env bash
# CIFAR-10 in the papers' settings, with the authors' hyperparameters as defaults:
# ResNet-20 with LSGD, MGRAWA, LGRAWA, EASGD and data-parallel SGD, and VGG-16 with LSGD.
# SGD momentum 0.9 (Nesterov), weight decay 1e-4, batch 128 per worker, lr 0.1;
# LSGD tau_G = 16, tau = 4, lambda = lambda_G = 0.1; GRAWA tau = 32, pull 0.5; EASGD beta 0.9.
#
#   DATA=/path/to/cifar NP=8 HOSTS=node1:4,node2:4 bash examples/cifar10_paper.sh
# Variables: DATA (folder with cifar-10-batches-py; DOWNLOAD=1 to fetch it), NP (ranks, default 4),
# HOSTS (mpirun host list), BUDGET (seconds per run, default 3600), OUT (default runs/cifar10),
# LAUNCH (launch/mpirun.sh or launch/horovodrun.sh). The LR drops 10x at 50% and 75% of the budget.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DATA=${DATA:?set DATA to the folder that holds cifar-10-batches-py}
NP=${NP:-4}
BUDGET=${BUDGET:-3600}
OUT=${OUT:-runs/cifar10}
LAUNCH=${LAUNCH:-$ROOT/launch/mpirun.sh}
EXTRA=()
[ "${DOWNLOAD:-0}" = 1 ] && EXTRA+=(--download)
MILESTONES=("$(python3 -c "print($BUDGET * 0.5)")" "$(python3 -c "print($BUDGET * 0.75)")")
run() {  # name, then train arguments
    local name=$1; shift
    bash "$LAUNCH" "$NP" -m horovod_leader.train --dataset cifar10 --data-dir "$DATA" "${EXTRA[@]}" \
        --time-budget "$BUDGET" --lr 0.1 --momentum 0.9 --weight-decay 1e-4 --batch-size 128 \
        --lr-time-milestones "${MILESTONES[@]}" --out "$OUT/$name" "$@"
}
run resnet20-lsgd     --model resnet20 --algo lsgd --period 4 --global-period 16 --local-pull 0.1 --global-pull 0.1
run resnet20-mgrawa   --model resnet20 --algo mgrawa --period 32 --pull 0.5
run resnet20-lgrawa   --model resnet20 --algo lgrawa --period 32 --pull 0.5
run resnet20-easgd    --model resnet20 --algo easgd --period 4 --beta 0.9
run resnet20-dp       --model resnet20 --algo dp
run vgg16-lsgd        --model vgg16 --algo lsgd --period 4 --global-period 16
"$ROOT/.venv/bin/python" -m horovod_leader.report "$OUT"/resnet20-* --target 0.9 --out "$OUT/report-resnet20"
