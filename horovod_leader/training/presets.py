"""``--preset paper``: every method's hyperparameters as the authors ran CIFAR-10.

Each value names where it comes from. "LSGD code" is the authors' public LSGD repository
(``train.sh``, ``codes/options.py``, ``codes/worker.py``, ``codes/worker_stoc_optim.py``,
``codes/worker_dist_optim.py``, ``codes/local_tools.py``); the GRAWA code builds on it.
Options given on the command line win over the preset; the preset sets no budget.
"""
from __future__ import annotations

import argparse
from typing import Dict, Iterable, List, NamedTuple, Set

PRESETS = ("paper",)


class Setting(NamedTuple):
    dest: str            # argparse destination (the key in config.json)
    value: object
    source: str


# What every method shares; each method's own settings are in its ``MethodSpec.paper``.
PAPER: List[Setting] = [
    Setting("lr", 0.1, "LSGD code train.sh (lr grid 1e-1, 1e-2, 1e-3; 0.1 the papers' choice)"),
    Setting("momentum", 0.9, "LSGD code train.sh (m=0.9)"),
    Setting("nesterov", True, "LSGD code worker_stoc_optim.py (nesterov = momentum > 0)"),
    Setting("weight_decay", 1e-4, "LSGD code options.py (--wd 1e-4)"),
    Setting("batch_size", 128, "LSGD code train.sh (batch_size=128, per worker)"),
    Setting("lr_gamma", 0.1, "LSGD code worker.py (lr x 0.1)"),
    Setting("sampling", "reshuffle", "LSGD code local_tools.py, worker.py (DistributedSampler, set_epoch)"),
    Setting("bn_batches", "full", "LSGD code worker_stoc_optim.py (a pass over the train loader)"),
]


def settings_for(algo: str) -> List[Setting]:
    """``--preset paper``'s settings for one method: the shared ones, then the method's own."""
    from horovod_leader.registry import METHODS

    return PAPER + [Setting(*setting) for setting in METHODS[algo].paper]


# The authors drop the LR 10x at 500 s of training time for these models (LSGD code
# worker.py: ``raw_time >= 500`` for vgg16 and resnet20); CNN7 keeps its LR.
TIME_MILESTONE_MODELS = ("resnet20", "vgg16")
TIME_MILESTONE_SOURCE = "LSGD code worker.py (raw_time >= 500 for resnet20 and vgg16)"


def paper_values(algo: str, model: str) -> Dict[str, object]:
    """dest -> value of ``--preset paper`` for one method and model."""
    values = {s.dest: s.value for s in settings_for(algo)}
    values["lr_time_milestones"] = [500.0] if model in TIME_MILESTONE_MODELS else []
    return values


def explicit_dests(parser: argparse.ArgumentParser, argv: Iterable[str]) -> Set[str]:
    """The destinations given on the command line: parse again with every default
    suppressed, so that only what the user typed appears."""
    saved = [(action, action.default) for action in parser._actions]
    try:
        for action, _ in saved:
            action.default = argparse.SUPPRESS
        return set(vars(parser.parse_args(list(argv))))
    finally:
        for action, default in saved:
            action.default = default


def apply(args: argparse.Namespace, explicit: Set[str]) -> Dict[str, object]:
    """Set the preset's values on ``args`` except those given explicitly; returns what it set."""
    if args.preset is None:
        return {}
    chosen = {dest: value for dest, value in paper_values(args.algo, args.model).items() if dest not in explicit}
    for dest, value in chosen.items():
        setattr(args, dest, value)
    return chosen
