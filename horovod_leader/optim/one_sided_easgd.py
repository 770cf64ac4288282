r"""The EASGD paper's asynchronous EASGD: a centre in MPI windows, reached one-sidedly.

Two asynchronous EASGD variants exist, and this toolkit offers both:

* ``OneSidedEASGD`` (this module) is the algorithm of the EASGD paper (Zhang, Choromanska and
  LeCun 2015, "asynchronous EASGD"): there are no rounds and no collectives. Every ``period``
  of its *own* steps, worker i reads the centre :math:`\tilde x`, and with
  :math:`d = \alpha\,(x_i - \tilde x)` sets

  .. math::

      x_i \leftarrow x_i - d, \qquad \tilde x \leftarrow \tilde x + d

  The centre lives in MPI windows sharded across the ranks (each rank hosts about 1/size of
  it); a worker reads a shard with an atomic ``MPI_Get_accumulate(NO_OP)`` and adds its d with
  ``MPI_Accumulate(SUM)``, so the owner of a shard takes no part. Reads and additions of
  different workers interleave freely, as in the paper.
* ``EASGD(asynchronous=True)`` is what the LSGD authors' code runs and what the LSGD paper
  compared against: a server counts the steps of all workers, and every ``size * period``
  global steps all workers join one elastic round (a collective). It is kept because that is
  the baseline of the LSGD and GRAWA papers' figures.

Health: a worker whose parameters are not finite adds nothing to the centre and is reset to
it (its optimizer state cleared, the recovery logged), so the centre only ever moves by
finite amounts. ``comm_bytes`` (collective payload) stays 0 during training; the one-sided
traffic is counted in ``one_sided_bytes``.

Requires parameters on the CPU in float32 or float64 (MPI one-sided operations work on host
memory), an MPI launch (``mpirun``, or ``horovodrun`` in MPI mode), and, with Open MPI 4.1
over TCP, every rank on one node: across nodes its one-sided components refuse the windows
(or, with ``ucx``, make each access wait for the target rank to enter MPI; measured 97-148 ms
per access on the emulated cluster). ``EASGD(asynchronous=True)`` works across nodes.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Tuple

import numpy as np
import torch

from horovod_leader.optim.base import DistributedWrapper
from horovod_leader.packing import key_name
from horovod_leader.validation import check_real


def shard_bounds(numel: int, size: int) -> List[Tuple[int, int]]:
    """Contiguous, nearly equal slices [lo, hi) of ``numel`` elements, one per rank."""
    edges = [numel * r // size for r in range(size + 1)]
    return list(zip(edges[:-1], edges[1:]))


class OneSidedEASGD(DistributedWrapper):
    r"""Asynchronous EASGD with a sharded centre and one-sided MPI (the EASGD paper's algorithm).

    Args:
        optimizer: the local optimizer over ``model``'s parameters.
        model: the model, on the CPU, with float32 or float64 parameters.
        period: :math:`\tau`, this worker's own steps between elastic updates (default 4).
        beta: :math:`\beta`; ``alpha`` defaults to ``beta / size`` (default 0.9).
        alpha: the moving rate :math:`\alpha`, in (0, 1].
    """

    name = "easgd1s"
    _state_world_keys = ("size",)  # each rank holds its own shard of the centre
    DEFAULT_PERIOD = 4
    DEFAULT_BETA = 0.9

    def _settings(self) -> Dict[str, Any]:
        return {**super()._settings(), "period": self.period, "beta": self.beta, "alpha": self._alpha_given}

    def __init__(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module, period: int = DEFAULT_PERIOD,
                 beta: float = DEFAULT_BETA, alpha=None, *, topology=None):
        self.beta = check_real("beta", beta, 0.0, 1.0, low_open=True)
        if alpha is not None:
            check_real("alpha", alpha, 0.0, 1.0, low_open=True)
        self._alpha_given = None if alpha is None else float(alpha)
        from horovod_leader import engine

        if engine.choose() == "torch":  # decided alike on every rank, before any collective
            raise ValueError("OneSidedEASGD keeps its centre in MPI windows, which the torch engine does not have: "
                             "run it on the Horovod engine (--backend horovod, or HOROVOD_LEADER_BACKEND=horovod) "
                             "under mpirun or horovodrun in MPI mode")
        for name, p in model.named_parameters():
            if not p.is_floating_point() and not p.is_complex():
                continue  # frozen (integer, bool): left alone, as by every wrapper
            if p.device.type != "cpu" or p.dtype not in (torch.float32, torch.float64):
                raise ValueError(f"model: OneSidedEASGD needs CPU float32/float64 parameters (MPI windows live in "
                                 f"host memory); parameter {name!r} is {p.dtype} on {p.device}")
        super().__init__(optimizer, model, period=period, topology=topology, broadcast_buffers=False)
        self.alpha = self.beta / self.size if alpha is None else float(alpha)
        self.asynchronous = True
        self.one_sided_bytes = 0
        self._open_windows()

    # ------------------------------------------------------------------ windows
    def _open_windows(self) -> None:
        from horovod_leader.launcher import require_mpi

        require_mpi("OneSidedEASGD")
        from mpi4py import MPI

        self._MPI = MPI
        self._comm = (self.topology.world_comm or MPI.COMM_WORLD).Dup()
        node = self._comm.Split_type(MPI.COMM_TYPE_SHARED)
        one_node = node.Get_size() == self._comm.Get_size()
        node.Free()
        if not one_node and os.environ.get("HOROVOD_LEADER_ONE_SIDED_ACROSS_NODES") != "1":
            # Same answer on every rank: nobody enters the window allocation.
            raise RuntimeError("OneSidedEASGD needs every rank on one node: across nodes, Open MPI 4.1's one-sided "
                               "components refuse its windows over TCP (or, with --mca osc ucx, make every access "
                               "wait for the target rank to enter MPI). Use EASGD(asynchronous=True) across nodes, "
                               "or set HOROVOD_LEADER_ONE_SIDED_ACROSS_NODES=1 where your MPI supports it")
        if self._comm.Get_size() != self.size:
            raise RuntimeError("OneSidedEASGD needs ranks started by MPI (mpirun, or horovodrun in MPI mode): "
                               f"MPI sees {self._comm.Get_size()} ranks, Horovod {self.size}")
        self._shards: Dict[Any, dict] = {}
        rank = self._comm.Get_rank()
        for key, flat in self.params.items():
            bounds = shard_bounds(flat.numel, self.size)
            lo, hi = bounds[rank]
            np_dtype = np.float32 if flat.flat.dtype == torch.float32 else np.float64
            mpi_type = MPI.FLOAT if np_dtype == np.float32 else MPI.DOUBLE
            itemsize = np.dtype(np_dtype).itemsize
            window = MPI.Win.Allocate(max(hi - lo, 1) * itemsize, disp_unit=itemsize, comm=self._comm)
            mine = np.frombuffer(window.tomemory(), dtype=np_dtype)[: hi - lo]
            # The centre starts as the workers' average: a reduce-scatter at construction (no
            # Horovod collective, and none at all once training runs).
            x = flat.flat.detach().numpy()
            counts = [b - a for a, b in bounds]
            window.Lock(rank, MPI.LOCK_EXCLUSIVE)
            self._comm.Reduce_scatter([x, mpi_type], [mine, mpi_type], recvcounts=counts, op=MPI.SUM)
            mine /= self.size
            window.Unlock(rank)
            self._shards[key] = {"window": window, "bounds": bounds, "type": mpi_type,
                                 "read": np.empty(max(hi - lo for lo, hi in bounds) or 1, dtype=np_dtype),
                                 "itemsize": itemsize}
        self._comm.Barrier()  # every centre shard is initialised before anyone reads one

    # ------------------------------------------------------------------ training
    def step(self, loss=None) -> None:
        """One step of the wrapped optimizer; every ``period`` steps, the elastic update."""
        self._begin_step(loss)
        self.optimizer.step()
        if self._steps % self.period == 0:
            for _ in self._round(self._steps // self.period):
                pass

    def _round(self, number: int, joined: bool = False):
        """The elastic update: one-sided reads and additions, no collective, so it posts
        nothing (a generator that yields nothing). It never runs for a closed rank."""
        self._elastic_update()
        return
        yield  # noqa: the body above makes this a generator that posts no collective

    def _elastic_update(self) -> None:
        MPI = self._MPI
        healthy = self._params_finite()
        rank = self._comm.Get_rank()
        with torch.no_grad():
            for key, flat in self.params.items():
                shard = self._shards[key]
                window, kind = shard["window"], shard["type"]
                x = flat.flat.numpy()
                for offset in range(self.size):  # start at the next rank, to spread the load on owners
                    owner = (rank + 1 + offset) % self.size
                    lo, hi = shard["bounds"][owner]
                    if hi == lo:
                        continue
                    centre = shard["read"][: hi - lo]
                    window.Lock(owner, MPI.LOCK_SHARED)
                    window.Get_accumulate([centre, kind], [centre, kind], owner, target=[0, hi - lo, kind],
                                          op=MPI.NO_OP)
                    window.Flush(owner)
                    if healthy:
                        d = self.alpha * (x[lo:hi] - centre)
                        x[lo:hi] -= d
                        window.Accumulate([d, kind], owner, target=[0, hi - lo, kind], op=MPI.SUM)
                        self.one_sided_bytes += 2 * (hi - lo) * shard["itemsize"]
                    else:
                        x[lo:hi] = centre
                        self.one_sided_bytes += (hi - lo) * shard["itemsize"]
                    window.Unlock(owner)
        if not healthy:
            self._log_recovery("the EASGD centre")

    def centre(self) -> Dict[Any, torch.Tensor]:
        """The whole centre: read one-sidedly from every shard while the wrapper is open (no
        collective: any rank may call it alone); after ``close()``, gathered from every rank's
        final shard with one Horovod all-gather per packed buffer, so every rank must call it."""
        if self._closed:
            from horovod_leader import engine

            hvd = engine.active()
            return {key: hvd.allgather(torch.from_numpy(self._final_shards[key].copy()),
                                       name=f"{self.name}.centre_shards.{key_name(key)}") for key in self.params}
        MPI = self._MPI
        out = {}
        for key, flat in self.params.items():
            shard = self._shards[key]
            whole = flat.like()
            buf = whole.numpy()
            for owner, (lo, hi) in enumerate(shard["bounds"]):
                if hi == lo:
                    continue
                shard["window"].Lock(owner, MPI.LOCK_SHARED)
                shard["window"].Get_accumulate([buf[lo:hi], shard["type"]], [buf[lo:hi], shard["type"]], owner,
                                               target=[0, hi - lo, shard["type"]], op=MPI.NO_OP)
                shard["window"].Unlock(owner)
            out[key] = whole
        return out

    def close(self) -> None:
        """Free the windows: returns on every rank once every rank has closed (no collective
        runs before that, so ranks may stop at different step counts)."""
        if self._closed:
            return
        self._comm.Barrier()  # every update has landed: the shards are final
        self._final_shards = {key: self._my_shard(key).copy() for key in self._shards}  # for state_dict
        self._closed = True
        for shard in self._shards.values():
            shard["window"].Free()
        self._comm.Free()

    # ------------------------------------------------------------------ checkpoints
    def _my_shard(self, key) -> np.ndarray:
        if self._closed:
            return self._final_shards[key]
        shard = self._shards[key]
        lo, hi = shard["bounds"][self._comm.Get_rank()]
        dtype = np.float32 if shard["type"] == self._MPI.FLOAT else np.float64
        return np.frombuffer(shard["window"].tomemory(), dtype=dtype)[: hi - lo]

    _required_state = ("centre_shard",)

    def _state(self) -> Dict[str, Any]:
        """This rank's shard of the centre (every rank saves its own)."""
        return {"one_sided_bytes": self.one_sided_bytes,
                "centre_shard": {key_name(key): torch.from_numpy(self._my_shard(key).copy()) for key in self.params}}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if self._closed:
            raise RuntimeError("OneSidedEASGD.load_state_dict: the wrapper is closed (its windows are freed)")
        super().load_state_dict(state)

    def _load_state(self, state: Dict[str, Any]) -> None:
        self.one_sided_bytes = int(state.get("one_sided_bytes", 0))
        rank = self._comm.Get_rank()
        for key, saved in self._match_named(state["centre_shard"], self.params, "centre_shard").items():
            window, mine = self._shards[key]["window"], self._my_shard(key)
            if saved.numel() != mine.size:
                raise ValueError(f"state_dict's centre shard has {saved.numel()} elements, this rank's has "
                                 f"{mine.size}: load it with the same number of ranks")
            window.Lock(rank, self._MPI.LOCK_EXCLUSIVE)
            mine[:] = saved.numpy()
            window.Unlock(rank)
        self._comm.Barrier()  # no rank reads a shard before its owner has restored it
