"""Collectives: the thin layer over Horovod that every wrapper talks through.

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


class Collectives:
    """Horovod collectives with byte accounting. One instance per optimizer wrapper."""

    def __init__(self, name: str = "horovod_leader"):
        import horovod.torch as hvd

        if not hvd.is_initialized():
            raise RuntimeError("Horovod is not initialised: call horovod_leader.init() (or hvd.init()) first")
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

    # The collectives are posted non-blocking and return a Horovod handle; ``wait(handle)``
    # returns the result (at once when ``hvd.poll(handle)`` is true). Synchronous wrappers
    # wait at once, asynchronous ones poll (see ``async_schedule.RefreshDriver``).
    def allgather_async(self, tensor: torch.Tensor, name: str, process_set: Optional[Any] = None):
        self.bytes += payload_bytes(tensor)
        return self._hvd.allgather_async(tensor, name=self._tag(name),
                                         process_set=process_set or self._hvd.global_process_set)

    def broadcast_async_(self, tensor: torch.Tensor, root_rank: int, name: str, process_set: Optional[Any] = None):
        self.bytes += payload_bytes(tensor)
        return self._hvd.broadcast_async_(tensor, root_rank=root_rank, name=self._tag(name),
                                          process_set=process_set or self._hvd.global_process_set)

    def allreduce_async_(self, tensor: torch.Tensor, name: str, process_set: Optional[Any] = None):
        """Non-blocking in-place sum."""
        self.bytes += payload_bytes(tensor)
        return self._hvd.allreduce_async_(tensor, op=self._hvd.Sum, name=self._tag(name),
                                          process_set=process_set or self._hvd.global_process_set)

    def wait(self, handle):
        return self._hvd.synchronize(handle)
