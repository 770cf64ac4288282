"""Topology: which ranks form a group (a node), and the Horovod process set of each group.

The multi-leader setting of LSGD needs, for every rank, its *group*: the workers that share a
node and a local leader. Groups come from the launcher:

* by default, one group per node. Under an MPI launcher (mpirun, srun, horovodrun in MPI
  mode) that is ``COMM_WORLD.Split_type(COMM_TYPE_SHARED)``, the shared-memory domain. In
  Horovod's Gloo mode (``horovodrun --gloo``, elastic mode, a Horovod built without MPI) the
  ranks were not started by MPI and mpi4py would see a world of one, so the groups come from
  Horovod's own view of the hosts: ranks with the same first rank on their host
  (``rank - local_rank``) share a node, and each node must hold ``local_size`` of them;
* with ``group_size=k`` (or ``HOROVOD_LEADER_GROUP_SIZE=k``), contiguous blocks of k ranks,
  which is how several nodes are simulated on one machine.

Every group gets a Horovod process set for its collectives (the local leader's broadcast).
Under MPI the sets are registered when Horovod is initialised (re-initialising it when it
already was). In Gloo mode Horovod is initialised only once, with dynamic process sets, and
the sets are added to it: Horovod 0.28.1 cannot be re-initialised reliably there (see
``launcher.gloo_horovod``).

How the ranks were launched (MPI or Horovod's Gloo mode, the world rank and size before any
communication) is ``horovod_leader.launcher``'s.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Tuple

from horovod_leader.launcher import NO_MPI_FIX, gloo_horovod, launched_by_mpi, world_size

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


def _thread_multiple() -> bool:
    """Whether MPI runs with ``MPI_THREAD_MULTIPLE``, which mpi4py's collectives need beside
    Horovod's background thread."""
    from mpi4py import MPI

    return MPI.Query_thread() == MPI.THREAD_MULTIPLE


@dataclass
class NodeSets:
    """One wrapper's sets for the node-aware exchanges (``Topology.node_sets``).

    Attributes:
        in_node: this rank's group: an ``MPIGroup`` or a Horovod process set.
        leaders: the nodes' first ranks (the ones that exchange across the links); a
            Horovod process set or an ``MPIGroup``; on other ranks it is not used.
        node_leaders: every group's first rank, in group order.
        relay: this group's first rank; ``is_relay``: whether this rank is it.
        group_size: ranks in this rank's group.
    """

    in_node: Any
    leaders: Any
    node_leaders: List[int]
    relay: int
    is_relay: bool
    group_size: int


@dataclass
class Topology:
    """Where this rank sits: its group (node) and the communicators for it.

    Attributes:
        rank, size: global rank and world size.
        groups: every group's global ranks, identical on all ranks.
        group: index of this rank's group in ``groups``.
        process_set: Horovod process set of this rank's group (the global one when there is
            a single group).
        comm: mpi4py communicator of this rank's group; ``None`` when the ranks were not
            started by MPI (Horovod in Gloo mode), where only Horovod's collectives exist.
        world_comm: the mpi4py communicator Horovod runs on (``init(comm=...)``; by default
            ``MPI.COMM_WORLD``); ``None`` in Gloo mode. What needs MPI beyond Horovod (the
            asynchronous step counter, the one-sided EASGD's windows) runs on it.
    """

    rank: int
    size: int
    groups: List[List[int]]
    group: int
    process_set: Any = field(default=None, repr=False)
    comm: Any = field(default=None, repr=False)
    process_sets: List[Any] = field(default_factory=list, repr=False)
    world_comm: Any = field(default=None, repr=False)
    leaders_set: Any = field(default=None, repr=False)

    @property
    def node_leaders(self) -> List[int]:
        """The first rank of every group: one per node, the ranks that exchange across the
        links in the node-aware exchanges."""
        return [ranks[0] for ranks in self.groups]

    @property
    def node_aware(self) -> bool:
        """Whether exchanges go through one rank per node: several groups, one of them with
        several ranks (with one node, or one rank per node, the flat exchanges are the same)."""
        return self.leaders_set is not None

    def node_sets(self, device: Any = "cpu") -> Optional["NodeSets"]:
        """The sets one wrapper's node-aware exchanges use for tensors on ``device``, or None
        when the flat exchanges apply (``node_aware`` is False, or the sets cannot carry
        tensors on ``device``).

        Inside the node: for CPU tensors under MPI, a private duplicate of the group's mpi4py
        communicator (over shared memory, outside Horovod's single queue, so that an exchange
        inside a node never waits behind one on the links; private, so that two wrappers'
        collectives never match each other's, as MPI matches them by order and Horovod by
        name); else the group's Horovod process set. Collective over the group when it
        duplicates: every wrapper calls it at construction, on every rank alike.
        """
        from horovod_leader.comm import MPIGroup

        if self.leaders_set is None:
            return None
        cpu = str(device).startswith("cpu")
        if not cpu and (isinstance(self.leaders_set, MPIGroup) or isinstance(self.process_set, MPIGroup)):
            return None  # MPI groups carry CPU tensors only: the flat Horovod exchanges
        in_node = self.process_set
        if cpu and self.comm is not None and _thread_multiple():
            in_node = MPIGroup(self.comm.Dup(), self.group_ranks)
        return NodeSets(in_node=in_node, leaders=self.leaders_set, node_leaders=self.node_leaders,
                        relay=self.node_leaders[self.group], is_relay=self.rank == self.node_leaders[self.group],
                        group_size=self.group_size)

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


def groups_from_host_views(views: Sequence[Tuple[int, int]]) -> List[List[int]]:
    """Groups from every rank's view of its host, ``(first rank of its host, local size)``,
    given in rank order: ranks with the same first rank share a host.

    horovodrun gives each host a contiguous block of ranks; anything else would make this rule
    group ranks of different hosts, so it is refused rather than guessed.
    """
    groups = groups_from_colors([first for first, _ in views])
    for ranks in groups:
        first, local_size = views[ranks[0]]
        if ranks != list(range(first, first + local_size)):
            raise RuntimeError(f"Horovod's view of the hosts is not contiguous blocks of ranks (ranks {ranks} claim "
                               f"the host that starts at rank {first}, of local size {local_size}): pass group_size")
    return groups


def horovod_host_groups() -> List[List[int]]:
    """The ranks of each host, from Horovod's own view (Gloo mode). Horovod must be
    initialised; one small all-gather, reached by every rank."""
    import horovod.torch as hvd

    views = hvd.allgather_object((hvd.rank() - hvd.local_rank(), hvd.local_size()),
                                 name="horovod_leader.topology.hosts")
    return groups_from_host_views(views)


def init(group_size: Optional[int] = None, comm=None, backend: Optional[str] = None) -> Topology:
    """Initialise the engine (Horovod, or torch.distributed) with one process set per group and
    return the Topology.

    Args:
        group_size: ranks per group. ``None`` (default) groups the ranks by node, unless the
            environment variable ``HOROVOD_LEADER_GROUP_SIZE`` is set. Must divide the world.
        comm: the mpi4py communicator to run on (default ``MPI.COMM_WORLD``); MPI only.
        backend: ``"horovod"`` or ``"torch"`` (``horovod_leader.engine``); default: the
            ``HOROVOD_LEADER_BACKEND`` environment variable, else ``"torch"`` when the process
            was started by ``torchrun`` and Horovod is not initialised, else ``"horovod"``.

    Works under MPI launchers and in Horovod's Gloo mode (see the module docstring); in Gloo
    mode the returned ``Topology.comm`` is ``None``. Under MPI, an earlier ``init()``'s Horovod
    is shut down and initialised again, because static process sets can only be registered at
    initialisation; but a Horovod that the program initialised itself (``hvd.init()`` first,
    as Horovod users do) is kept, since re-initialising it could finalise the MPI it started:
    the groups' sets are then added to it when it has dynamic process sets, and otherwise
    the group collectives run over the groups' mpi4py communicators (``comm.MPIGroup``). In
    Gloo mode an earlier call's initialisation is kept and the new groups' sets are added to it.

    Raises:
        ValueError: on every rank, before any communication, when ``group_size`` does not
            divide the world size or is below 1, when ``comm`` is given without MPI, or
            ``backend`` is not an engine (or is Horovod where it is not installed).
        RuntimeError: in Gloo mode, when Horovod was initialised by a plain ``hvd.init()``
            (it cannot be re-initialised reliably there; see ``launcher.gloo_horovod``).
    """
    from horovod_leader import engine

    if engine.choose(backend) == "torch":
        if comm is not None:
            raise ValueError("comm: an MPI communicator is for the Horovod engine; the torch engine runs on "
                             "torch.distributed's default group (leave comm=None)")
        return _init_torch(group_size)
    engine.activate("horovod")
    if not launched_by_mpi():
        if comm is not None:
            raise ValueError(f"comm: an MPI communicator needs ranks started by MPI, and this run is in Horovod's "
                             f"Gloo mode ({NO_MPI_FIX}, or leave comm=None)")
        return _init_gloo(group_size)
    from mpi4py import MPI
    import horovod.torch as hvd

    comm = MPI.COMM_WORLD if comm is None else comm
    group_size = resolve_group_size(group_size, comm.Get_size())
    group_comm, groups = split_groups(comm, group_size)

    if hvd.is_initialized() and not _registry.get("initialised_here"):
        # The program called hvd.init() itself: re-initialising could finalise the MPI that
        # Horovod started, so keep its initialisation and attach the groups to it.
        return _attach(groups, group_comm, comm)
    if hvd.is_initialized():
        hvd.shutdown()
    process_sets = _process_sets(groups, comm.Get_size())
    leaders = hvd.ProcessSet(node_leaders(groups)) if _needs_leaders(groups) else None
    hvd.init(comm=comm, process_sets=process_sets + ([leaders] if leaders is not None else []))
    _registry["initialised_here"] = True
    return _register(groups, process_sets, group_comm, comm, leaders)


def _attach(groups: List[List[int]], group_comm, world_comm) -> Topology:
    """Groups for a Horovod that the program initialised itself (``hvd.init()``), under MPI.

    With dynamic process sets (``hvd.init(process_sets="dynamic")`` or
    ``HOROVOD_DYNAMIC_PROCESS_SETS=1``) the groups' sets are added to Horovod. Otherwise the
    group collectives (the local leaders' broadcasts) run over the groups' mpi4py
    communicators (``comm.MPIGroup``): Horovod 0.28.1 registers static sets only when it is
    initialised.
    """
    import horovod.torch as hvd

    from horovod_leader.comm import MPIGroup

    if len(groups) == 1:
        return _register(groups, [], group_comm, world_comm)
    if os.environ.get("HOROVOD_DYNAMIC_PROCESS_SETS") == "1":
        added = _registry.setdefault("dynamic_sets", {})
        process_sets = []
        for ranks in groups + ([node_leaders(groups)] if _needs_leaders(groups) else []):
            # collective: every rank adds the same sets in the same order
            process_set = added.get(tuple(ranks))
            if process_set is None or not _still_registered(process_set):
                process_set = added[tuple(ranks)] = hvd.add_process_set(ranks)
            process_sets.append(process_set)
        leaders = process_sets.pop() if _needs_leaders(groups) else None
        return _register(groups, process_sets, group_comm, world_comm, leaders)
    rank = hvd.rank()
    process_sets = [MPIGroup(group_comm if rank in ranks else None, ranks) for ranks in groups]
    leaders = None
    if _needs_leaders(groups):  # the node leaders' own communicator (a collective split of the world)
        from mpi4py import MPI

        first = node_leaders(groups)
        leaders_comm = world_comm.Split(0 if rank in first else MPI.UNDEFINED, rank)
        leaders = MPIGroup(leaders_comm if rank in first else None, first)
    return _register(groups, process_sets, group_comm, world_comm, leaders)


def _init_torch(group_size: Optional[int]) -> Topology:
    """The torch engine: ``torch.distributed`` initialised from torchrun's environment (Gloo for
    CPU tensors, NCCL for CUDA ones), groups by host name (or blocks of ``group_size``), one
    subgroup per group and one of the nodes' first ranks. No MPI communicator."""
    import socket

    from horovod_leader import engine

    torch_engine = engine.activate("torch")
    torch_engine.init()
    size = torch_engine.size()
    group_size = resolve_group_size(group_size, size)
    if group_size is not None:
        groups = blocks_of(size, group_size)
    else:  # the ranks of each host: every rank's host name, in rank order
        names = torch_engine.allgather_object(socket.gethostname())
        first = {}
        groups = groups_from_colors([first.setdefault(name, rank) for rank, name in enumerate(names)])
    added = _registry.setdefault("torch_sets", {})
    process_sets = []
    for ranks in groups + ([node_leaders(groups)] if _needs_leaders(groups) else []):
        if len(ranks) == size:
            continue  # the default group
        # Collective over the whole world: every rank creates every subgroup, in the same order.
        if tuple(ranks) not in added:
            added[tuple(ranks)] = torch_engine.add_process_set(ranks)
        process_sets.append(added[tuple(ranks)])
    leaders = process_sets.pop() if _needs_leaders(groups) else None
    return _register(groups, process_sets, None, None, leaders)


def forget_torch_groups() -> None:
    """The torch engine shut down: its subgroups and the topology built on them are gone."""
    from horovod_leader.engine import ProcessSet

    _registry.pop("torch_sets", None)
    if isinstance(getattr(_registry.get("current"), "process_set", None), ProcessSet):
        _registry.pop("current")


def _init_gloo(group_size: Optional[int]) -> Topology:
    """Gloo mode: groups from Horovod's view of the hosts (or blocks), no MPI communicator.
    Horovod is initialised once (see ``launcher.gloo_horovod``); the groups' process sets are added
    to it, or reused when an earlier call added them."""
    size = world_size()
    group_size = resolve_group_size(group_size, size)
    hvd = gloo_horovod()
    groups = blocks_of(size, group_size) if group_size is not None else horovod_host_groups()
    added = _registry.setdefault("gloo_sets", {})  # ranks -> ProcessSet, added to this initialisation
    process_sets = []
    for ranks in groups + ([node_leaders(groups)] if _needs_leaders(groups) else []):
        if len(ranks) == size:
            continue  # the global set
        process_set = added.get(tuple(ranks))
        if process_set is None or not _still_registered(process_set):
            # Collective: every rank adds the same sets in the same order.
            process_set = added[tuple(ranks)] = hvd.add_process_set(ranks)
        process_sets.append(process_set)
    leaders = process_sets.pop() if _needs_leaders(groups) else None
    return _register(groups, process_sets, None, None, leaders)


def _still_registered(process_set) -> bool:
    try:
        return process_set.size() == len(process_set.ranks)
    except ValueError:  # Horovod was shut down and initialised again since it was added
        return False


def node_leaders(groups: List[List[int]]) -> List[int]:
    return [ranks[0] for ranks in groups]


def _needs_leaders(groups: List[List[int]]) -> bool:
    """Node-aware exchanges apply: several groups, at least one of several ranks."""
    return len(groups) > 1 and any(len(ranks) > 1 for ranks in groups)


def _process_sets(groups: List[List[int]], size: int) -> list:
    import horovod.torch as hvd

    # A process set equal to the whole world is Horovod's global set; registering it twice fails.
    return [hvd.ProcessSet(ranks) for ranks in groups if len(ranks) < size]


def _register(groups: List[List[int]], process_sets: list, group_comm, world_comm=None, leaders_set=None) -> Topology:
    from horovod_leader import engine

    hvd = engine.active()
    rank = hvd.rank()
    group = next(index for index, ranks in enumerate(groups) if rank in ranks)
    all_sets = [hvd.global_process_set] if len(groups) == 1 else process_sets
    topology = Topology(rank=rank, size=hvd.size(), groups=groups, group=group,
                        process_set=all_sets[group], comm=group_comm, process_sets=all_sets, world_comm=world_comm,
                        leaders_set=leaders_set)
    _registry["current"] = topology
    return topology


def current() -> Topology:
    """The topology of the last ``init()``; a single group when Horovod was initialised by
    ``hvd.init()`` directly (one leader: plain LSGD)."""
    from horovod_leader import engine

    hvd = engine.active()
    if not hvd.is_initialized():
        raise RuntimeError(f"{engine.name()} is not initialised: call horovod_leader.init() first")
    topology = _registry.get("current")
    if topology is None or topology.size != hvd.size():
        if engine.name() == "horovod" and launched_by_mpi():  # hvd.init() alone: one group, or HOROVOD_LEADER_GROUP_SIZE's blocks
            from mpi4py import MPI
            group_comm, groups = split_groups(MPI.COMM_WORLD, resolve_group_size(None, hvd.size()) or hvd.size())
            return _attach(groups, group_comm, MPI.COMM_WORLD)
        topology = Topology(rank=hvd.rank(), size=hvd.size(), groups=[list(range(hvd.size()))], group=0,
                            process_set=hvd.global_process_set, comm=None,
                            process_sets=[hvd.global_process_set])
        _registry["current"] = topology
    return topology
