"""Helpers for the programs that tests/ runs under mpirun."""
# Collectives in these programs are always named: Horovod names unnamed ones by a per-process
# handle counter, which differs between ranks whose groups issued different numbers of ops.
from __future__ import annotations

import contextlib
import sys

import horovod.torch as hvd


@contextlib.contextmanager
def check(name: str):
    """Run a named check; print PASS on success (pytest demands it from every rank)."""
    yield
    _say(f"PASS {name} rank={hvd.rank()}")


def value(key: str, text) -> None:
    _say(f"VALUE {key} rank={hvd.rank()} {text}")


def _say(line: str) -> None:
    # One write per line: under mpirun, ranks' outputs interleave between writes.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def close_enough(a, b, tol=1e-6) -> bool:
    return all(abs(float(x) - float(y)) <= tol for x, y in zip(a, b)) and len(a) == len(b)
