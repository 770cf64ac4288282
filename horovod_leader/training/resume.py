"""``--resume OUT``: the run in OUT continues with the configuration it was started with.

A resumed run takes every option from ``OUT/config.json`` (written at the start of the run,
rewritten at each resume), so that ``--resume OUT`` alone continues the run exactly as it was
configured: the same method, hyperparameters, groups and data. An option given again on the
command line must repeat the saved value, except those that may change between the segments
of a run (``MAY_CHANGE``): the budget (``--time-budget``, ``--epochs``), how often it evaluates
and checkpoints, and the progress display. Anything else that differs is refused with an
error naming the option, before any rank communicates.

``--preset`` is not applied again: the saved configuration already holds what it set, and
the options that were given explicitly over it.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, Iterable, List

MAY_CHANGE = ("time_budget", "epochs", "eval_every", "eval_subset", "checkpoint_every", "no_progress")

# Keys of config.json that are not options, or that resuming sets itself.
NOT_OPTIONS = ("world_size", "groups", "resume", "out")


def option_names(parser: argparse.ArgumentParser) -> Dict[str, str]:
    """argparse destination -> the option's name on the command line (``asynchronous`` -> ``--async``)."""
    names = {}
    for action in parser._actions:
        long = [s for s in action.option_strings if s.startswith("--")]
        if long:
            names.setdefault(action.dest, long[0])
    return names


def saved_config(out) -> Dict:
    """OUT/config.json as a dict; a clear error naming ``--resume`` when it is missing or unreadable."""
    path = Path(out) / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"--resume {out!r} has no config.json (expected {path}): is it an output folder of "
                         f"this command?") from None
    except (OSError, ValueError) as error:
        raise ValueError(f"--resume {out!r}: cannot read {path}: {error}") from None


def conflicts(args: argparse.Namespace, explicit: Iterable[str], saved: Dict,
              names: Dict[str, str]) -> List[str]:
    """The options given on the command line that differ from the saved run and may not change."""
    found = []
    for dest in sorted(explicit):
        if dest in MAY_CHANGE or dest in NOT_OPTIONS or dest not in saved:
            continue
        given, before = getattr(args, dest), saved[dest]
        if given != before and not (given is None and before is None):
            found.append(f"{names.get(dest, dest)} {_show(given)} (the run in {args.resume} was started with "
                         f"{_show(before)})")
    return found


def _show(value) -> str:
    if isinstance(value, list):
        return " ".join(str(v) for v in value) or "(none)"
    return str(value)


def restore(args: argparse.Namespace, explicit: Iterable[str], parser: argparse.ArgumentParser) -> argparse.Namespace:
    """``args`` with the saved configuration of ``args.resume`` in place of every option that was
    not given explicitly; raises ``ValueError`` naming each conflicting option."""
    explicit = set(explicit)
    saved = saved_config(args.resume)
    names = option_names(parser)
    bad = conflicts(args, explicit, saved, names)
    if bad:
        allowed = ", ".join(names[d] for d in MAY_CHANGE)
        raise ValueError("--resume continues a run with its saved configuration; these options differ from it: "
                         + "; ".join(bad) + f". Only {allowed} may change when resuming")
    if "out" in explicit and Path(args.out).resolve() != Path(args.resume).resolve():
        raise ValueError(f"--out {args.out!r} with --resume {args.resume!r}: a resumed run writes into the folder it "
                         f"resumes (leave out --out)")
    restored = argparse.Namespace(**vars(args))
    for dest, value in saved.items():
        if dest in NOT_OPTIONS or dest in explicit or not hasattr(args, dest):
            continue  # options added since the run started keep their defaults
        setattr(restored, dest, value)
    restored.out = args.resume
    return restored


def check_groups(saved_groups, groups) -> None:
    """After the groups are formed: they must be the saved run's (checkpoints are per rank,
    and LSGD's leaders are per group)."""
    if saved_groups is not None and [list(g) for g in saved_groups] != [list(g) for g in groups]:
        raise ValueError(f"--resume: the run was started with the groups {saved_groups}, this job forms {groups} "
                         f"(--group-size, or the ranks per node): launch it as before")
