"""Bytes that crossed this node's link while the training clock ran.

The first rank of each node (local rank 0) reads the byte counters of the node's network
interfaces, every one but the loopback, from ``/proc/self/net/dev``, which shows the
process's own network namespace: on a node of the emulated cluster, its one rate-limited
link. ``LinkLedger`` reads them when training starts and at the start and end of every block
that the training clock excludes (evaluations, checkpoint writes), and writes a JSON file:

* ``train``: bytes sent (``tx``) and received (``rx``) while the training clock ran, i.e.
  the sum over the training intervals [start or end of a block, start of the next block];
* ``whole``: bytes from the ledger's creation to its last write (set-up, initial broadcast,
  evaluations and shut-down included).

The counters are at the Ethernet level (each frame's headers included) and count everything
on the link: the collectives' payloads, TCP/IP and Ethernet headers, acknowledgements, and
the MPI library's and Horovod's control messages. The other ranks of the node reach the same
blocks within one collective of it (synchronous methods), so the intervals match theirs up
to the traffic of that collective's start.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path
from typing import Dict, Optional

COUNTER_FILE = "/proc/self/net/dev"


def link_bytes() -> Dict[str, int]:
    """{'rx': ..., 'tx': ...}: bytes received and sent by every non-loopback interface of this
    process's network namespace (``/proc/net/dev``: 8 receive columns, then the send ones)."""
    rx = tx = 0
    for line in Path(COUNTER_FILE).read_text().splitlines()[2:]:
        name, _, columns = line.partition(":")
        if name.strip() == "lo":
            continue
        fields = columns.split()
        rx += int(fields[0])
        tx += int(fields[8])
    return {"rx": rx, "tx": tx}


def _difference(after: Dict[str, int], before: Dict[str, int]) -> Dict[str, int]:
    return {key: after[key] - before[key] for key in after}


class LinkLedger:
    """Bytes on the node's link, split into training time and the whole run."""

    def __init__(self, path: Path):
        self.path = path
        self.program_start = link_bytes()
        self.train = {"rx": 0, "tx": 0}
        self.mark: Optional[Dict[str, int]] = None  # counters when the current training interval began
        self.intervals = 0

    def training_starts(self) -> None:
        self.mark = link_bytes()

    def training_pauses(self) -> None:
        if self.mark is None:
            return
        spent = _difference(link_bytes(), self.mark)
        self.train = {key: self.train[key] + spent[key] for key in self.train}
        self.mark = None
        self.intervals += 1
        self.write()

    def write(self) -> None:
        record = {"host": socket.gethostname(), "train": self.train, "train_intervals": self.intervals,
                  "whole": _difference(link_bytes(), self.program_start)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps(record))
        temporary.replace(self.path)


def counting_clock(ledger: LinkLedger):
    """A TrainingClock that tells ``ledger`` when the training clock starts and stops running."""
    from horovod_leader.training.clock import TrainingClock

    class LinkCountingClock(TrainingClock):
        depth = 0

        def start(self) -> None:
            super().start()
            ledger.training_starts()

        @contextlib.contextmanager
        def excluded(self):
            outermost = self.depth == 0
            if outermost:
                ledger.training_pauses()
            self.depth += 1
            try:
                with super().excluded():
                    yield
            finally:
                self.depth -= 1
            if outermost:
                ledger.training_starts()

    return LinkCountingClock


def local_rank() -> int:
    for variable in ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "LOCAL_RANK", "SLURM_LOCALID"):
        if variable in os.environ:
            return int(os.environ[variable])
    return 0
