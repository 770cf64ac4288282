"""Ending the whole job when one rank fails, instead of leaving the others in a collective.

In a synchronous job every rank waits for every other one in each collective: a rank that
stops on an exception leaves the others waiting forever, and Horovod's shutdown at exit then
waits for them too. So an exception that would end one rank ends the job: its traceback is
printed with the rank, then the MPI job is aborted (``MPI_Abort``), which the launcher
(``mpirun``, ``horovodrun``, Slurm) turns into the end of every rank. Without MPI (Horovod in
Gloo mode) the process exits at once with status 1, skipping the shutdown that would wait,
and ``horovodrun`` stops the other ranks.

Two ways in:

* ``install_excepthook()`` (done when a wrapper is created): an exception that nothing
  catches aborts the job, whether or not ``with opt:`` is used;
* leaving ``with opt:`` by an exception aborts the job (``DistributedWrapper.__exit__``).

Set ``HOROVOD_LEADER_ABORT_ON_EXCEPTION=0`` to keep Python's own behaviour (for example when
an outer ``try`` is meant to handle the error on every rank alike).
"""
from __future__ import annotations

import os
import sys
import traceback

_installed = False


def enabled() -> bool:
    return os.environ.get("HOROVOD_LEADER_ABORT_ON_EXCEPTION", "1") != "0"


def _rank() -> str:
    for var in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "HOROVOD_RANK", "SLURM_PROCID", "RANK"):
        if var in os.environ:
            return os.environ[var]
    return "?"


def abort_job(exc_type, exc, tb, status: int = 1) -> None:
    """Print the exception with this rank's number, then end every rank of the job."""
    sys.stderr.write(f"horovod_leader: rank {_rank()} failed; ending the whole job so that no rank waits "
                     f"in a collective:\n")
    traceback.print_exception(exc_type, exc, tb, file=sys.stderr)
    sys.stderr.flush()
    sys.stdout.flush()
    if "mpi4py.MPI" in sys.modules:
        from mpi4py import MPI

        if MPI.Is_initialized() and not MPI.Is_finalized():
            MPI.COMM_WORLD.Abort(status)
    os._exit(status)


def _hook(exc_type, exc, tb) -> None:
    if issubclass(exc_type, SystemExit):  # sys.exit() is a normal, deliberate end
        return _previous(exc_type, exc, tb)
    abort_job(exc_type, exc, tb)


_previous = sys.excepthook


def install_excepthook() -> None:
    """An uncaught exception on this rank ends the whole job (idempotent)."""
    global _installed, _previous
    if _installed or not enabled():
        return
    _previous = sys.excepthook
    sys.excepthook = _hook
    _installed = True
