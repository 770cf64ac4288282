"""One rank of a cluster benchmark run: the training command, plus the bytes that crossed its
node's link while the training clock ran.

    python benchmarks/cluster_rank.py [--link-counters DIR] TRAIN-OPTIONS...

Without ``--link-counters`` it is ``python -m horovod_leader.train TRAIN-OPTIONS``. With it,
the first rank of each node writes ``DIR/HOSTNAME.json``, the bytes its node's link carried
while the training clock ran and in the whole program (``horovod_leader.training.links``).
"""
from __future__ import annotations

import socket
import sys
from pathlib import Path

from horovod_leader.training.links import LinkLedger, counting_clock, local_rank


def main(argv) -> int:
    ledger = None
    if argv[:1] == ["--link-counters"]:
        folder, argv = Path(argv[1]), argv[2:]
        if local_rank() == 0:
            ledger = LinkLedger(folder / f"{socket.gethostname()}.json")
    from horovod_leader.training import command as train
    from horovod_leader.training import clock

    if ledger is not None:
        # The trainer builds its clock from the module attribute; the instrumented clock
        # differs from it only in telling the ledger when training pauses and resumes.
        clock.TrainingClock = counting_clock(ledger)
        if hasattr(train, "TrainingClock"):
            train.TrainingClock = clock.TrainingClock
    status = train.main(argv)
    if ledger is not None:
        ledger.write()
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
