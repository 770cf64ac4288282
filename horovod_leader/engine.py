"""The collectives engine: Horovod (the default) or torch.distributed.

Every collective of the toolkit goes through ``active()``: Horovod's ``horovod.torch`` module,
or ``TorchEngine``, which offers the same calls over ``torch.distributed``, so that the wrappers,
the evaluation and the training command read alike on both.

Which engine (``choose``): ``hl.init(backend="horovod" | "torch")``, else the
``HOROVOD_LEADER_BACKEND`` environment variable, else the torch engine when the process was
started by ``torchrun`` (its ``RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE`` and
``TORCHELASTIC_RUN_ID`` variables) and Horovod is not initialised, else Horovod. The Horovod
engine under ``torchrun`` is refused (each rank would be a world of its own).

On the torch engine:

* collectives are ``torch.distributed`` operations with ``async_op=True``, polled through
  ``Work.is_completed()``; they run in the order they are posted, the same on every rank of a
  group (the toolkit posts them so), where Horovod matches them by name;
* the process group uses Gloo for CPU tensors and NCCL for CUDA tensors (``cpu:gloo,cuda:nccl``
  where CUDA is available);
* groups are ``torch.distributed`` subgroups (``add_process_set``), one per node;
* what needs MPI itself (the one-sided EASGD's windows) is refused, naming ``--backend``;
* dtypes Gloo cannot carry (int16: the bf16 codec's payloads) travel as a float16 view of the
  same bytes, in all-gathers and broadcasts (never reduced).
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Callable, List, Optional

import torch

BACKEND_ENV = "HOROVOD_LEADER_BACKEND"
BACKENDS = ("horovod", "torch")
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID")
#: dtypes Gloo cannot carry (the bf16 codec's int16 payloads): sent as a float16 view of the same bytes
_VIEWED = {torch.int16: torch.float16}

_state = {"engine": None, "name": None}
#: how every message says that Horovod is absent (the test suite skips the checks needing it on it)
HOROVOD_MISSING = "Horovod is not installed (the set-up skipped it, or its build failed)"


def started_by_torchrun() -> bool:
    """torchrun's agent set this process's environment (``TORCHELASTIC_RUN_ID`` with the rank
    variables; a cluster prologue that exports ``RANK`` alone does not count)."""
    return all(os.environ.get(name, "").strip() for name in TORCHRUN_VARIABLES)


def horovod_available() -> bool:
    try:
        import horovod.torch  # noqa: F401
    except ImportError:
        return False
    return True


def choose(backend: Optional[str] = None) -> str:
    """The engine to use: ``backend``, else ``HOROVOD_LEADER_BACKEND``, else torch under torchrun
    (when Horovod is not initialised) or without Horovod installed, else Horovod.

    Raises:
        ValueError: on every rank alike, for a name that is not an engine.
    """
    source = "backend"
    if backend is None and _state["name"] is not None:  # the engine this process already runs
        return _state["name"]
    if backend is None and os.environ.get(BACKEND_ENV, "").strip():
        backend, source = os.environ[BACKEND_ENV].strip().lower(), BACKEND_ENV
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"{source} must be one of {list(BACKENDS)}, got {backend!r}")
        if backend == "horovod" and not horovod_available():
            raise ValueError(f"{source}=horovod, but {HOROVOD_MISSING}: use the torch engine (backend='torch', "
                             f"--backend torch)")
        if backend == "horovod" and started_by_torchrun():
            raise ValueError(f"{source}=horovod, but torchrun started this process: each rank would be a Horovod "
                             f"world of its own; use the torch engine (--backend torch) under torchrun, or launch "
                             f"with mpirun or horovodrun for Horovod")
        return backend
    if _state["name"] is not None:
        return _state["name"]
    if not horovod_available():
        return "torch"
    import horovod.torch as hvd

    if started_by_torchrun() and not hvd.is_initialized():
        return "torch"
    return "horovod"


def activate(name: str):
    """Make ``name`` the engine of this process; returns it."""
    if name == "torch":
        if not isinstance(_state["engine"], TorchEngine):
            _state["engine"] = TorchEngine()
    else:
        import horovod.torch as hvd

        _state["engine"] = hvd
    _state["name"] = name
    return _state["engine"]


def active():
    """The engine in use: the one ``activate`` chose, else the one ``choose()`` names."""
    if _state["engine"] is None:
        activate(choose())
    return _state["engine"]


def name() -> str:
    active()
    return _state["name"]


class ProcessSet:
    """Some ranks and their ``torch.distributed`` group (None: the whole world), like
    Horovod's ``ProcessSet``."""

    def __init__(self, ranks: List[int], group=None):
        self.ranks = list(ranks)
        self.group = group

    def size(self) -> int:
        return len(self.ranks)

    def included(self) -> bool:
        import torch.distributed as dist

        return dist.get_rank() in self.ranks

    def __repr__(self) -> str:
        return f"ProcessSet(ranks={self.ranks})"


class Handle:
    """A posted collective: its ``Work``, what it fills, and what to do with that once done."""

    def __init__(self, work, result, finish: Optional[Callable[[Any], Any]] = None):
        self.work, self.result, self.finish = work, result, finish


class TorchEngine:
    """Horovod's calls that the toolkit uses, over ``torch.distributed``.

    ``init()`` initialises the default process group from the environment (``torchrun``'s, or
    ``MASTER_ADDR``/``MASTER_PORT``/``RANK``/``WORLD_SIZE``); ``root_rank`` is always a rank of
    the whole world, as in Horovod."""

    Sum, Average = "sum", "average"

    def __init__(self):
        self.global_process_set = ProcessSet([], None)

    # ---- life cycle
    def init(self, timeout: float = 600.0) -> None:
        """Initialise the default process group from torchrun's environment (once).

        Raises:
            RuntimeError: on every rank alike, when the environment does not say where the
                rendezvous is (the process was not started by torchrun).
        """
        import torch.distributed as dist

        if not dist.is_initialized():
            missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
            if missing and not horovod_available():
                raise RuntimeError(f"{HOROVOD_MISSING}, so the toolkit runs on its torch engine, which initialises "
                                   f"torch.distributed from torchrun's environment, and {missing} are not set: "
                                   f"launch with torchrun (mpirun and horovodrun need Horovod: run the set-up "
                                   f"without HOROVOD_LEADER_SKIP_HOROVOD)")
            if missing:
                raise RuntimeError(f"the torch engine initialises torch.distributed from torchrun's environment, and "
                                   f"{missing} are not set: launch with torchrun (or choose the Horovod engine, "
                                   f"--backend horovod / {BACKEND_ENV}=horovod, under mpirun or horovodrun)")
            backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout))
        self.global_process_set = ProcessSet(list(range(dist.get_world_size())), None)

    def is_initialized(self) -> bool:
        import torch.distributed as dist

        return dist.is_available() and dist.is_initialized()

    def shutdown(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            # every rank leaves together: a rank that tears Gloo down while a peer still has a
            # connection open may abort that peer's process at exit
            dist.barrier()
            dist.destroy_process_group()
        from horovod_leader import topology

        topology.forget_torch_groups()

    def rank(self) -> int:
        import torch.distributed as dist

        return dist.get_rank()

    def size(self) -> int:
        import torch.distributed as dist

        return dist.get_world_size()

    def local_rank(self) -> int:
        return int(os.environ.get("LOCAL_RANK", 0))

    def local_size(self) -> int:
        return int(os.environ.get("LOCAL_WORLD_SIZE", self.size()))

    @staticmethod
    def mpi_built() -> bool:
        return False

    @staticmethod
    def gloo_built() -> bool:
        return True

    def add_process_set(self, ranks: List[int]) -> ProcessSet:
        """A subgroup; collective: every rank of the world calls it, in the same order."""
        import torch.distributed as dist

        return ProcessSet(ranks, dist.new_group(sorted(ranks)))

    # ---- non-blocking collectives
    def _group(self, process_set):
        return None if process_set is None else process_set.group

    def _members(self, process_set) -> int:
        return self.size() if process_set is None or process_set.group is None else process_set.size()

    def allreduce_async_(self, tensor, op=None, name=None, process_set=None, **_):
        import torch.distributed as dist

        work = dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self._group(process_set), async_op=True)
        members = self._members(process_set)  # Horovod's default op is the average
        return Handle(work, tensor, (lambda t: t.div_(members)) if op in (None, self.Average) else None)

    def allgather_async(self, tensor, name=None, process_set=None, **_):
        import torch.distributed as dist

        dtype = tensor.dtype
        tensor = tensor.contiguous()
        if dtype in _VIEWED:
            tensor = tensor.view(_VIEWED[dtype])
        parts = [torch.empty_like(tensor) for _ in range(self._members(process_set))]
        work = dist.all_gather(parts, tensor, group=self._group(process_set), async_op=True)
        return Handle(work, parts, lambda ps: torch.cat(ps, 0).view(dtype))

    def broadcast_async_(self, tensor, root_rank, name=None, process_set=None, **_):
        import torch.distributed as dist

        wire = tensor.view(_VIEWED[tensor.dtype]) if tensor.dtype in _VIEWED else tensor  # the same bytes
        work = dist.broadcast(wire, src=root_rank, group=self._group(process_set), async_op=True)
        return Handle(work, tensor)

    @staticmethod
    def poll(handle: Handle) -> bool:
        return bool(handle.work.is_completed())

    @staticmethod
    def synchronize(handle: Handle):
        handle.work.wait()
        return handle.finish(handle.result) if handle.finish is not None else handle.result

    # ---- blocking forms
    def allreduce_(self, tensor, op=None, name=None, process_set=None, **_):
        return self.synchronize(self.allreduce_async_(tensor, op, name, process_set))

    def allreduce(self, tensor, op=None, name=None, process_set=None, **_):
        return self.allreduce_(tensor.detach().clone(), op, name, process_set)

    def allgather(self, tensor, name=None, process_set=None, **_):
        return self.synchronize(self.allgather_async(tensor, name, process_set))

    def broadcast_(self, tensor, root_rank, name=None, process_set=None, **_):
        return self.synchronize(self.broadcast_async_(tensor, root_rank, name, process_set))

    def broadcast(self, tensor, root_rank, name=None, process_set=None, **_):
        return self.broadcast_(tensor.detach().clone(), root_rank, name, process_set)

    def allgather_object(self, obj, name=None, process_set=None, **_):
        import torch.distributed as dist

        out = [None] * self._members(process_set)
        dist.all_gather_object(out, obj, group=self._group(process_set))
        return out

    def broadcast_object(self, obj, root_rank=0, name=None, process_set=None, **_):
        import torch.distributed as dist

        holder = [obj]
        dist.broadcast_object_list(holder, src=root_rank, group=self._group(process_set))
        return holder[0]

    def broadcast_parameters(self, params, root_rank=0) -> None:
        """Rank ``root_rank``'s values of a state dict or of (name, tensor) pairs, in place."""
        items = list(params.items() if isinstance(params, dict) else params)
        if items and isinstance(items[0], torch.Tensor):  # bare tensors, in the order given
            items = [(str(i), t) for i, t in enumerate(items)]
        else:
            items = sorted(items, key=lambda item: item[0])
        with torch.no_grad():
            for _, tensor in items:
                if not isinstance(tensor, torch.Tensor):
                    continue
                if tensor.is_contiguous():
                    self.broadcast_(tensor.data, root_rank)
                else:  # Gloo sends contiguous tensors only
                    tensor.copy_(self.broadcast(tensor.contiguous(), root_rank))

    def join(self) -> None:
        """Every rank has closed (the wrappers' closing protocols already joined the others'
        rounds): a barrier, as ``hvd.join()`` returns once every rank has joined."""
        import torch.distributed as dist

        dist.barrier()


class TorchWorld:
    """The few calls of an mpi4py world communicator that the asynchronous mode's TCP step
    counter makes (``async_schedule.TcpStepCounter``), over the torch engine's default group."""

    def __init__(self, engine: TorchEngine):
        self.engine = engine

    def Get_rank(self) -> int:
        return self.engine.rank()

    def Get_size(self) -> int:
        return self.engine.size()

    def Dup(self) -> "TorchWorld":
        return self

    def bcast(self, obj, root: int = 0):
        return self.engine.broadcast_object(obj, root)

    def allgather(self, obj) -> list:
        return self.engine.allgather_object(obj)

    def Barrier(self) -> None:
        self.engine.join()

    def Free(self) -> None:
        pass
