"""Collectives: the thin layer over the engine (Horovod, or torch.distributed: ``engine``) that
every wrapper talks through.

It does two things besides calling Horovod:

* counts ``comm_bytes``: the payload bytes of every collective this rank joins (the size of
  the tensor it hands to Horovod), so methods can be compared on communication volume;
* takes ``process_set=`` the way Horovod does, so group and global collectives read alike.

Horovod is imported lazily, so the rest of the package works without it.
"""
from __future__ import annotations

from typing import Any, Optional

import torch


def payload_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


#: the dtypes Horovod's collectives take; a broadcast of any other (bool, uint16, ...) sends the raw bytes
HOROVOD_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.float32,
                  torch.float64)


def as_sendable(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, or a uint8 view of its bytes when Horovod refuses its dtype (bool masks,
    say). A broadcast into the view fills the tensor itself."""
    if tensor.dtype in HOROVOD_DTYPES or (tensor.dtype == torch.bfloat16 and tensor.device.type == "cuda"):
        return tensor
    if tensor.is_floating_point() or not tensor.is_contiguous():
        raise ValueError(f"cannot send a {tensor.dtype} tensor{'' if tensor.is_contiguous() else ' that is not contiguous'}")
    return tensor.reshape(-1).view(torch.uint8)


class MPIGroup:
    """A group's collectives over an mpi4py communicator instead of a Horovod process set.

    Used when the groups' process sets could not be registered with Horovod: the program
    called ``hvd.init()`` itself, without dynamic process sets, and Horovod 0.28.1 registers
    static sets only at initialisation (re-initialising would finalise an MPI that Horovod
    started). ``ranks`` are the global ranks of the group, in order.
    """

    def __init__(self, comm, ranks):
        self.comm = comm
        self.ranks = list(ranks)

    def included(self) -> bool:
        return True

    def size(self) -> int:
        return len(self.ranks)

    def __repr__(self) -> str:
        return f"MPIGroup(ranks={self.ranks})"


class MPIHandle:
    """A posted mpi4py non-blocking collective, polled like a Horovod handle."""

    def __init__(self, request, tensor: torch.Tensor):
        self.request = request
        self.tensor = tensor

    def poll(self) -> bool:
        return bool(self.request.Test())

    def wait(self) -> torch.Tensor:
        self.request.Wait()
        return self.tensor


def poll(handle) -> bool:
    """Whether a posted collective (Horovod's or an ``MPIHandle``) has finished."""
    if isinstance(handle, MPIHandle):
        return handle.poll()
    from horovod_leader import engine

    return engine.active().poll(handle)


def synchronize(handle):
    """Wait for a posted collective and return its result."""
    if isinstance(handle, MPIHandle):
        return handle.wait()
    from horovod_leader import engine

    return engine.active().synchronize(handle)


def _mpi_ready(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` if mpi4py can send it in place (contiguous, on the CPU); a clear error otherwise."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise RuntimeError("collectives over an MPI group need contiguous CPU tensors (GPU tensors travel through "
                           "Horovod's process sets: call horovod_leader.init() instead of hvd.init(), or "
                           "hvd.init(process_sets='dynamic') before it)")
    return tensor


class Collectives:
    """Horovod collectives with byte accounting. One instance per optimizer wrapper."""

    def __init__(self, name: str = "horovod_leader"):
        from horovod_leader import engine

        hvd = engine.active()  # Horovod, or the torch.distributed engine
        if not hvd.is_initialized():
            raise RuntimeError(f"{engine.name()} is not initialised: call horovod_leader.init() (or hvd.init()) first")
        self._hvd = hvd
        self._name = name
        self.bytes = 0

    def _tag(self, name: str) -> str:
        # Horovod matches collectives across ranks by name. Stable names (the same one for the
        # same exchange every round) also let Horovod's response cache skip negotiation.
        return f"{self._name}.{name}"

    @property
    def rank(self) -> int:
        return self._hvd.rank()

    @property
    def size(self) -> int:
        return self._hvd.size()

    @property
    def global_process_set(self):
        return self._hvd.global_process_set

    def allgather_object(self, obj: Any, name: str) -> list:
        """Gather a small picklable object from every rank (used for signatures and checks)."""
        return self._hvd.allgather_object(obj, name=self._tag(name))

    def broadcast_object(self, obj: Any, root_rank: int, name: str) -> Any:
        """``root_rank``'s picklable object, on every rank."""
        return self._hvd.broadcast_object(obj, root_rank=root_rank, name=self._tag(name))

    # The collectives are posted non-blocking and return a Horovod handle; ``wait(handle)``
    # returns the result (at once when ``hvd.poll(handle)`` is true). Synchronous wrappers
    # wait at once, asynchronous ones poll (see ``async_schedule.RefreshDriver``).
    # ``counted=False``: a hop that forwards what this rank already counted (the node-aware
    # exchanges' relays): ``bytes`` counts each rank's part in a method's exchange once.
    def allgather_async(self, tensor: torch.Tensor, name: str, process_set: Optional[Any] = None,
                        counted: bool = True):
        """Non-blocking gather of every member's ``tensor`` along the first dimension."""
        self.bytes += payload_bytes(tensor) if counted else 0
        if isinstance(process_set, MPIGroup):
            tensor = _mpi_ready(tensor).contiguous()
            out = torch.empty((process_set.size() * tensor.shape[0],) + tuple(tensor.shape[1:]), dtype=tensor.dtype)
            request = process_set.comm.Iallgather(tensor.view(torch.uint8).numpy(), out.view(torch.uint8).numpy())
            return MPIHandle(request, out)
        return self._hvd.allgather_async(tensor, name=self._tag(name),
                                         process_set=process_set or self._hvd.global_process_set)

    def broadcast_async_(self, tensor: torch.Tensor, root_rank: int, name: str, process_set: Optional[Any] = None,
                         counted: bool = True):
        """Non-blocking in-place broadcast; a dtype Horovod refuses (bool) travels as its bytes."""
        tensor = as_sendable(tensor)
        self.bytes += payload_bytes(tensor) if counted else 0
        if isinstance(process_set, MPIGroup):
            # MPI has no bfloat16 type: the raw bytes travel, whatever the dtype.
            request = process_set.comm.Ibcast(_mpi_ready(tensor).view(torch.uint8).numpy(),
                                              root=process_set.ranks.index(root_rank))
            return MPIHandle(request, tensor)
        return self._hvd.broadcast_async_(tensor, root_rank=root_rank, name=self._tag(name),
                                          process_set=process_set or self._hvd.global_process_set)

    def allreduce_async_(self, tensor: torch.Tensor, name: str, process_set: Optional[Any] = None,
                         counted: bool = True):
        """Non-blocking in-place sum (float32 or float64 over an MPI group)."""
        self.bytes += payload_bytes(tensor) if counted else 0
        if isinstance(process_set, MPIGroup):
            from mpi4py import MPI

            if tensor.dtype not in (torch.float32, torch.float64):
                raise RuntimeError(f"a sum over an MPI group needs float32 or float64 tensors, got {tensor.dtype}")
            request = process_set.comm.Iallreduce(MPI.IN_PLACE, _mpi_ready(tensor).numpy(), op=MPI.SUM)
            return MPIHandle(request, tensor)
        return self._hvd.allreduce_async_(tensor, op=self._hvd.Sum, name=self._tag(name),
                                          process_set=process_set or self._hvd.global_process_set)

    def wait(self, handle):
        return synchronize(handle)
