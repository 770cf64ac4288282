"""How the ranks were launched, known without communicating: by MPI (mpirun, srun, horovodrun
in MPI mode), by Horovod's Gloo mode (``horovodrun --gloo``, elastic mode, a Horovod built
without MPI), or by ``torchrun`` (the torch engine, ``horovod_leader.engine``); this process's
world rank and the world size; and one small all-gather that every rank reaches whatever the
launcher (``gather_from_every_rank``).

What needs MPI itself says so: ``require_mpi(feature)`` raises ``MPIRequired`` with the cause
and the fix on every rank, without communicating, when the run is in Gloo mode.
"""
from __future__ import annotations

import os
from typing import Any, List

NO_MPI_FIX = "launch with horovodrun in MPI mode or mpirun"


class MPIRequired(RuntimeError):
    """A feature that needs MPI was asked for in a run without it (Horovod in Gloo mode)."""


def launched_by_mpi() -> bool:
    """True when the ranks were started by MPI (mpirun, srun, horovodrun in MPI mode).

    False when Horovod runs in Gloo mode: ``horovodrun --gloo`` and elastic runs set
    ``HOROVOD_CONTROLLER=gloo``, and a Horovod built without MPI has nothing else. Decided
    from the environment and the build alone, so every rank gets the same answer without
    communicating.
    """
    from horovod_leader.engine import started_by_torchrun

    if started_by_torchrun():
        return False
    controller = os.environ.get("HOROVOD_CONTROLLER", "").strip().lower()
    if controller:
        return controller != "gloo"
    try:
        import horovod.torch as hvd
    except ImportError:  # no Horovod: MPI launchers say so in the environment
        return any(variable in os.environ for variable in MPI_VARIABLES)
    return bool(hvd.mpi_built())


#: what MPI launchers (Open MPI, MPICH and Intel MPI's Hydra, PMIx) set in every rank's environment
MPI_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")


def mpi_required_message(feature: str) -> str:
    return (f"{feature} needs MPI's one-sided operations, which count every worker's steps for the "
            "asynchronous rounds, and this run has no MPI: Horovod runs in Gloo mode (horovodrun --gloo, "
            f"elastic mode, or a Horovod built without MPI). Fix: {NO_MPI_FIX}.")


def require_mpi(feature: str) -> None:
    """Raise ``MPIRequired`` naming ``feature``, the cause and the fix, when the run has no MPI.

    Called where such a feature is built (the asynchronous variants' global step counter), so
    that every rank stops there with the same message and no rank waits for another.
    """
    if not launched_by_mpi():
        raise MPIRequired(mpi_required_message(feature))


def world_rank() -> int:
    """This process's rank in the whole job, without communicating."""
    from horovod_leader.engine import started_by_torchrun

    if started_by_torchrun():
        return int(os.environ["RANK"])
    if launched_by_mpi():
        from mpi4py import MPI
        return MPI.COMM_WORLD.Get_rank()
    return _horovod_env_int("HOROVOD_RANK", "rank")


def world_size() -> int:
    """The number of ranks in the whole job, without communicating (in Gloo mode outside
    horovodrun, which sets ``HOROVOD_SIZE``, Horovod is initialised to ask it)."""
    from horovod_leader.engine import started_by_torchrun

    if started_by_torchrun():
        return int(os.environ["WORLD_SIZE"])
    if launched_by_mpi():
        from mpi4py import MPI
        return MPI.COMM_WORLD.Get_size()
    return _horovod_env_int("HOROVOD_SIZE", "size")


def _horovod_env_int(variable: str, attribute: str) -> int:
    # horovodrun --gloo tells every worker its rank and the world size in the environment;
    # otherwise Horovod itself is asked (which initialises it).
    raw = os.environ.get(variable, "").strip()
    if raw.isdigit():
        return int(raw)
    return getattr(gloo_horovod(), attribute)()


def gather_from_every_rank(value: Any, name: str) -> List[Any]:
    """One small all-gather of a picklable ``value`` that every rank must reach: over
    torch.distributed under torchrun, over MPI when the ranks were started by MPI, else over
    Horovod (Gloo); each initialised if needed. Returns the values of ranks 0, 1, ... in order."""
    from horovod_leader import engine

    if engine.started_by_torchrun() and engine.choose() == "torch":
        torch_engine = engine.activate("torch")
        torch_engine.init()
        return torch_engine.allgather_object(value, name=name)
    if launched_by_mpi():
        from mpi4py import MPI
        return MPI.COMM_WORLD.allgather(value)
    return gloo_horovod().allgather_object(value, name=name)


def gloo_horovod():
    """Horovod in Gloo mode, initialised once with dynamic process sets.

    In Gloo mode Horovod is never initialised twice: Horovod 0.28.1's rendezvous server can
    keep a finished rendezvous' addresses (its DELETE handler clears every scope's list of
    finished ranks when one scope completes), and a re-initialising rank may then read a
    peer's stale address and abort with "Connection refused". Dynamic process sets let
    ``init()`` add the groups' sets to the one initialisation instead.
    """
    import horovod.torch as hvd

    if not hvd.is_initialized():
        hvd.init(process_sets="dynamic")
    elif os.environ.get("HOROVOD_DYNAMIC_PROCESS_SETS") != "1":
        raise RuntimeError("Horovod was initialised (hvd.init()) in Gloo mode without dynamic process sets, and "
                           "Horovod cannot be re-initialised reliably in Gloo mode: call horovod_leader.init() "
                           "instead of hvd.init(), or hvd.init(process_sets='dynamic') before it")
    return hvd
