"""Topology: which ranks form a group (a node), and the Horovod process set of each group.

The multi-leader setting of LSGD needs, for every rank, its *group*: the workers that share a
node and a local leader. Groups come from MPI itself:

* by default, ``COMM_WORLD.Split_type(COMM_TYPE_SHARED)``: one group per node (shared memory
  domain), which is what a cluster launch with several ranks per node gives;
* with ``group_size=k`` (or ``HOROVOD_LEADER_GROUP_SIZE=k``), contiguous blocks of k ranks,
  which is how several nodes are simulated on one machine.

Every group gets a Horovod process set, registered when Horovod is initialised, so that group
collectives (the local leader's broadcast) need no dynamic process sets.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Tuple

GROUP_SIZE_ENV = "HOROVOD_LEADER_GROUP_SIZE"

# The topology of the last init(). Horovod's own state is per process, and so is this: it
# lets wrappers built without an explicit ``topology=`` find the groups Horovod was given.
_registry: dict = {}


def resolve_group_size(group_size: Optional[int], world_size: int) -> Optional[int]:
    """Validate ``group_size`` (or the environment variable) against the world size.

    Runs on every rank with the same inputs and no communication, so a bad value raises the
    same ``ValueError`` everywhere before any collective is entered.
    Returns ``None`` when groups should follow the nodes.
    """
    source = "group_size"
    if group_size is None and os.environ.get(GROUP_SIZE_ENV, "").strip():
        raw = os.environ[GROUP_SIZE_ENV].strip()
        source = GROUP_SIZE_ENV
        try:
            group_size = int(raw)
        except ValueError:
            raise ValueError(f"{GROUP_SIZE_ENV}={raw!r} is not an integer; expected a divisor of the world size {world_size}") from None
    if group_size is None:
        return None
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise ValueError(f"{source} must be an integer >= 1 that divides the world size {world_size}, got {group_size!r}")
    if group_size < 1 or world_size % group_size != 0:
        divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
        raise ValueError(f"{source}={group_size} must divide the world size {world_size}; allowed values: {divisors}")
    return group_size


def blocks_of(world_size: int, group_size: int) -> List[List[int]]:
    """Contiguous groups of ``group_size`` ranks: [[0..k-1], [k..2k-1], ...]."""
    return [list(range(start, start + group_size)) for start in range(0, world_size, group_size)]


def groups_from_colors(colors: Sequence[int]) -> List[List[int]]:
    """Turn one colour per rank (e.g. the lowest rank of its node) into sorted rank lists,
    ordered by their first rank, so every rank derives the same list."""
    by_color: dict = {}
    for rank, color in enumerate(colors):
        by_color.setdefault(color, []).append(rank)
    return sorted(by_color.values(), key=lambda ranks: ranks[0])


@dataclass
class Topology:
    """Where this rank sits: its group (node) and the communicators for it.

    Attributes:
        rank, size: global rank and world size.
        groups: every group's global ranks, identical on all ranks.
        group: index of this rank's group in ``groups``.
        process_set: Horovod process set of this rank's group (the global one when there is
            a single group).
        comm: mpi4py communicator of this rank's group.
    """

    rank: int
    size: int
    groups: List[List[int]]
    group: int
    process_set: Any = field(default=None, repr=False)
    comm: Any = field(default=None, repr=False)
    process_sets: List[Any] = field(default_factory=list, repr=False)

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @property
    def group_ranks(self) -> List[int]:
        """Global ranks of this rank's group."""
        return self.groups[self.group]

    @property
    def group_rank(self) -> int:
        """This rank's index inside its group."""
        return self.group_ranks.index(self.rank)

    @property
    def group_size(self) -> int:
        return len(self.group_ranks)

    def group_of(self, rank: int) -> int:
        """Index of the group that holds global ``rank``."""
        for index, ranks in enumerate(self.groups):
            if rank in ranks:
                return index
        raise ValueError(f"rank {rank} is not in this topology of size {self.size}")

    def describe(self) -> str:
        return f"{self.size} ranks in {self.num_groups} group(s): " + " ".join(
            "[" + ",".join(map(str, ranks)) + "]" for ranks in self.groups)


def split_groups(comm, group_size: Optional[int]) -> Tuple[Any, List[List[int]]]:
    """Split ``comm`` into group communicators with mpi4py; return (group_comm, all groups)."""
    from mpi4py import MPI

    rank, size = comm.Get_rank(), comm.Get_size()
    if group_size is None:
        group_comm = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
        # A node's colour is its lowest global rank; one allgather tells everyone every node.
        color = group_comm.allreduce(rank, op=MPI.MIN)
        groups = groups_from_colors(comm.allgather(color))
    else:
        groups = blocks_of(size, group_size)
        group_comm = comm.Split(color=rank // group_size, key=rank)
    return group_comm, groups


def init(group_size: Optional[int] = None, comm=None) -> Topology:
    """Initialise Horovod over MPI with one process set per group and return the Topology.

    Args:
        group_size: ranks per group. ``None`` (default) groups the ranks by node, unless the
            environment variable ``HOROVOD_LEADER_GROUP_SIZE`` is set. Must divide the world.
        comm: the mpi4py communicator to run on (default ``MPI.COMM_WORLD``).

    If Horovod was already initialised (by ``hvd.init()`` or an earlier call), it is shut down
    and initialised again, because process sets can only be registered at initialisation.

    Raises:
        ValueError: on every rank, before any communication, when ``group_size`` does not
            divide the world size or is below 1.
    """
    from mpi4py import MPI
    import horovod.torch as hvd

    comm = MPI.COMM_WORLD if comm is None else comm
    group_size = resolve_group_size(group_size, comm.Get_size())
    group_comm, groups = split_groups(comm, group_size)

    if hvd.is_initialized():
        hvd.shutdown()
    # A process set equal to the whole world is Horovod's global set; registering it twice fails.
    extra = [ranks for ranks in groups if len(ranks) < comm.Get_size()]
    process_sets = [hvd.ProcessSet(ranks) for ranks in extra]
    hvd.init(comm=comm, process_sets=process_sets)

    rank = hvd.rank()
    group = next(index for index, ranks in enumerate(groups) if rank in ranks)
    if len(groups) == 1:
        all_sets = [hvd.global_process_set]
    else:
        all_sets = process_sets
    topology = Topology(rank=rank, size=hvd.size(), groups=groups, group=group,
                        process_set=all_sets[group], comm=group_comm, process_sets=all_sets)
    _registry["current"] = topology
    return topology


def current() -> Topology:
    """The topology of the last ``init()``; a single group when Horovod was initialised by
    ``hvd.init()`` directly (one leader: plain LSGD)."""
    import horovod.torch as hvd

    if not hvd.is_initialized():
        raise RuntimeError("Horovod is not initialised: call horovod_leader.init() first")
    topology = _registry.get("current")
    if topology is None or topology.size != hvd.size():
        from mpi4py import MPI
        topology = Topology(rank=hvd.rank(), size=hvd.size(), groups=[list(range(hvd.size()))], group=0,
                            process_set=hvd.global_process_set, comm=MPI.COMM_WORLD,
                            process_sets=[hvd.global_process_set])
        _registry["current"] = topology
    return topology
