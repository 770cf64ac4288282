"""Several methods, one after another, in one launch (the quick start's runner).

    mpirun -np 4 python -m horovod_leader.compare --methods dp "lsgd --overlap 2" mgrawa \\
        --out runs/compare TRAIN-OPTIONS...

Each method runs exactly as ``python -m horovod_leader.train --algo ALGO [ITS OPTIONS]
--out OUT/NAME TRAIN-OPTIONS`` would, with the same seed, data, budget and clock, but in the
same processes: Python, torch, Horovod, the groups and the data are set up once instead of
once per method. ``NAME`` is the method's words joined by hyphens (``lsgd-overlap-2``). The
first rank of each node also writes ``OUT/NAME/links/HOSTNAME.json``: the bytes its node's
link carried while the method's training clock ran (``horovod_leader.training.links``).

Every rank checks every method's options before any collective, and all stop together,
naming the ranks and the method, when one is bad.
"""
from __future__ import annotations

import argparse
import re
import shlex
import socket
import sys
from pathlib import Path
from typing import List, Optional, Tuple

PROG = "horovod-leader-compare"


def run_name(method: List[str]) -> str:
    """``["lsgd", "--overlap", "2"]`` -> ``"lsgd-overlap-2"``."""
    words = [re.sub(r"[^A-Za-z0-9.]+", "-", word).strip("-") for word in method]
    return "-".join(word for word in words if word)


def plan(argv: List[str]) -> Tuple[Optional[list], Optional[str]]:
    """([(name, args) per method], None) or (None, error); never communicates."""
    from horovod_leader.training.command import parse_and_validate

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0], add_help=True)
    parser.add_argument("--methods", nargs="+", required=True, metavar="'ALGO [OPTIONS]'",
                        help="the methods in order, each an --algo value with its own options in one word")
    parser.add_argument("--out", default="runs/compare", help="each method writes to OUT/NAME")
    try:
        own, rest = parser.parse_known_args(argv)
    except SystemExit:
        return None, "bad options for the comparison (see --help)"
    if "--algo" in rest or "--resume" in rest:
        return None, "give the methods in --methods (an --algo value each), not --algo or --resume"
    runs, names = [], set()
    for text in own.methods:
        method = shlex.split(text)
        if not method:
            return None, "--methods holds an empty method"
        name = run_name(method)
        if name in names:
            return None, f"--methods names {text!r} twice"
        names.add(name)
        args, error = parse_and_validate([*rest, "--algo", *method, "--out", str(Path(own.out) / name)])
        if error:
            return None, f"method {text!r}: {error}"
        runs.append((name, args))
    for option, attribute in (("--group-size", "group_size"), ("--backend", "backend")):
        seen = {getattr(args, attribute) for _, args in runs}
        if len(seen) > 1:  # one launch, one topology and one engine
            return None, f"every method must use the same {option}, got {sorted(seen, key=str)}"
    return runs, None


def main(argv: Optional[List[str]] = None) -> int:
    from horovod_leader.training.command import Trainer, agreed_on_every_rank

    runs, error = plan(list(sys.argv[1:] if argv is None else argv))
    if not agreed_on_every_rank(error, PROG):
        return 2
    import horovod_leader as hl
    from horovod_leader.training.links import LinkLedger, counting_clock, local_rank

    topo = hl.init(group_size=runs[0][1].group_size, backend=runs[0][1].backend)
    hvd = hl.engine.active()
    for name, args in runs:
        if topo.rank == 0:
            print(f"== {name}", flush=True)
        ledger = (LinkLedger(Path(args.out) / "links" / f"{socket.gethostname()}.json") if local_rank() == 0
                  else None)
        Trainer(args, topo, clock=counting_clock(ledger)() if ledger is not None else None).run()
        if ledger is not None:
            ledger.write()
    hvd.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
