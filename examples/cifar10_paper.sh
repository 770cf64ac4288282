#!/usr/bin/env bash
# The papers' CIFAR-10 runs with the authors' hyperparameters (--preset paper): every method
# on each model, under the papers' training-time budgets (12 minutes for LSGD, EASGD and
# data-parallel SGD, 15 for GRAWA), then one report per model. The LR drops 10x at 500 s of
# training time for ResNet-20 and VGG-16 (set by the preset). Augmentation follows the model:
# the authors' 28x28 crops for ResNet-20 and CNN7, the standard 32x32 crops for VGG-16.
#
#   DATA=/path/to/cifar NP=4 bash examples/cifar10_paper.sh
#   DATA=/path/to/cifar NP=16 HOSTS=n1:4,n2:4,n3:4,n4:4 bash examples/cifar10_paper.sh
# Variables: DATA (folder with cifar-10-batches-py; DOWNLOAD=1 to fetch it), NP (ranks, default 4),
# HOSTS (host list), MODELS (default "resnet20 cnn7 vgg16"), ALGOS (default "lsgd mgrawa lgrawa
# easgd dp"), SEED (default 36, the first of GRAWA's seeds), OUT (default runs/cifar10-$NP),
# LAUNCH (launch/mpirun.sh or launch/horovodrun.sh).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DATA=${DATA:?set DATA to the folder that holds cifar-10-batches-py}
NP=${NP:-4}
MODELS=${MODELS:-resnet20 cnn7 vgg16}
ALGOS=${ALGOS:-lsgd mgrawa lgrawa easgd dp}
SEED=${SEED:-36}
OUT=${OUT:-runs/cifar10-$NP}
LAUNCH=${LAUNCH:-$ROOT/launch/mpirun.sh}
EXTRA=()
[ "${DOWNLOAD:-0}" = 1 ] && EXTRA+=(--download)
for model in $MODELS; do
    for algo in $ALGOS; do
        case $algo in mgrawa|lgrawa) budget=900 ;; *) budget=720 ;; esac
        bash "$LAUNCH" "$NP" -m horovod_leader.train --preset paper --dataset cifar10 --data-dir "$DATA" \
            "${EXTRA[@]}" --model "$model" --algo "$algo" --time-budget "$budget" --seed "$SEED" \
            --out "$OUT/$model-$algo"
    done
    "$ROOT/.venv/bin/python" -m horovod_leader.report "$OUT/$model"-* --target 0.9 --out "$OUT/report-$model"
done
