"""Asynchronous scheduling: a global step count without per-step synchronisation.

The papers' asynchronous algorithms (LSGD's Algorithm 1, GRAWA's asynchronous variants) count
the steps of *all* workers together: a refresh is due whenever the total crosses a multiple
of ``size * period``, so a fast worker takes more steps between refreshes than a slow one.

Design, in three pieces:

* ``GlobalStepCounter``: two integers in an MPI window on rank 0 (total steps, closed ranks).
  Each step does one atomic ``MPI_Fetch_and_op`` (one-sided: rank 0 does not take part, and
  no other rank waits), which returns the new total. That is the choice when all ranks share
  a node. Across nodes, ``TcpStepCounter`` keeps the same counters in a small server process
  that rank 0 starts (``horovod_leader.step_counter_server``): Open MPI 4.1's one-sided
  components refuse such a window over TCP, or make each update wait for rank 0 to enter MPI.
  ``HOROVOD_LEADER_STEP_COUNTER=mpi|tcp`` forces either.
* ``RefreshDriver``: a refresh is written as a generator that posts Horovod *non-blocking*
  collectives and yields their handles. The driver resumes it when ``hvd.poll`` says they are
  done, so the worker keeps computing while the slower workers catch up and join; the pull is
  applied as soon as the data has arrived. Driven with ``block=True`` the same generator is
  the synchronous refresh.
* Rounds keep pace with the global count. After each step a worker advances its in-flight
  round as far as its collectives allow and starts the next due round in the same step once
  the previous one has completed. When the *next* round is already due while its current one
  is still in flight, the worker waits for the current one instead of falling further behind.
  Every round therefore starts at most one round behind the count: with ``unit`` global steps
  per round, a worker starts round n when the total T satisfies ``T // unit - n <= 1``
  (``rounds_history`` records T). In the normal case (a round completes within a round
  interval) nobody waits, and the collectives overlap with the workers' computation.

  Why one round bounds it: a worker with round m in flight adds a step only while the total
  it last read was below ``(m + 1) * unit``, and a round completes on nobody before every
  worker has started it. So before the last worker starts round m + 1, the total is below
  ``(m + 2) * unit + size``, which is less than ``(m + 3) * unit``.

Shutdown: ``close()`` increments the closed count, then keeps joining every refresh that the
total makes due until every rank has closed: only the rounds that fall due after the last
step are served there. All ranks then see the same final total and join the same last
refresh, so no rank waits in a collective for one that has left.
"""
from __future__ import annotations

import time
from typing import Callable, Generator, Iterable, Optional

import numpy as np

TOTAL, CLOSED = 0, 1


class GlobalStepCounter:
    """Atomic counters shared by all ranks, advanced with one-sided MPI operations."""

    def __init__(self, comm=None):
        from horovod_leader.launcher import require_mpi

        # In Horovod's Gloo mode there is no MPI world to hold the window: every rank stops
        # here with the cause and the fix, before anything communicates.
        require_mpi("asynchronous mode (asynchronous=True, --async)")
        from mpi4py import MPI

        self._MPI = MPI
        self.comm = (MPI.COMM_WORLD if comm is None else comm).Dup()
        # Allocate (not Create) lets MPI place the window in shared memory on one node.
        size = 2 * 8 if self.comm.Get_rank() == 0 else 0
        self.window = MPI.Win.Allocate(size, disp_unit=8, comm=self.comm)
        if self.comm.Get_rank() == 0:
            np.frombuffer(self.window.tomemory(), dtype=np.int64)[:] = 0
        self.comm.Barrier()  # the counters are zero before anyone adds to them
        self._one = np.ones(1, dtype=np.int64)
        self._out = np.zeros(1, dtype=np.int64)

    def _fetch_add(self, which: int, value: int) -> int:
        MPI = self._MPI
        self._one[0] = value
        self.window.Lock(0, MPI.LOCK_SHARED)
        self.window.Fetch_and_op(self._one, self._out, 0, target_disp=which, op=MPI.SUM if value else MPI.NO_OP)
        self.window.Unlock(0)
        return int(self._out[0]) + value

    def add_step(self) -> int:
        """Count one step of this rank; returns the new total over all ranks."""
        return self._fetch_add(TOTAL, 1)

    def total(self) -> int:
        return self._fetch_add(TOTAL, 0)

    def close(self) -> int:
        """Count this rank as closed; returns how many ranks have closed."""
        return self._fetch_add(CLOSED, 1)

    def closed(self) -> int:
        return self._fetch_add(CLOSED, 0)

    @property
    def size(self) -> int:
        return self.comm.Get_size()

    def free(self) -> None:
        self.comm.Barrier()
        self.window.Free()
        self.comm.Free()


class TcpStepCounter(GlobalStepCounter):
    """The same counters, kept by a separate server process started by rank 0 and reached
    over TCP (``horovod_leader.step_counter_server``): for runs across nodes, where Open MPI's
    one-sided operations either refuse the window or wait for rank 0 to enter MPI."""

    def __init__(self, comm=None):
        import socket
        import struct
        import subprocess
        import sys

        from horovod_leader import step_counter_server as server

        self._struct, self._reply = server.REQUEST, server.REPLY
        if comm is None:
            from mpi4py import MPI

            comm = MPI.COMM_WORLD
        self.comm = comm.Dup()  # an mpi4py communicator, or the torch engine's ``TorchWorld``
        self._server = None
        where = None
        if self.comm.Get_rank() == 0:
            self._server = subprocess.Popen([sys.executable, "-m", "horovod_leader.step_counter_server"],
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            port = int(self._server.stdout.readline().split()[1])
            where = (_own_addresses(), port)
        addresses, port = self.comm.bcast(where, root=0)
        self._socket = None
        for address in (["127.0.0.1"] if self.comm.Get_rank() == 0 else []) + addresses:
            try:
                self._socket = socket.create_connection((address, port), timeout=5)
                break
            except OSError:
                continue
        reached = self.comm.allgather(self._socket is not None)
        if not all(reached):
            raise RuntimeError(f"asynchronous mode: ranks {[r for r, ok in enumerate(reached) if not ok]} cannot reach "
                               f"the step counter on rank 0 (tried {addresses}, port {port}); set "
                               "HOROVOD_LEADER_STEP_COUNTER=mpi to use MPI's one-sided operations instead")
        self._socket.settimeout(None)
        self._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._ops = {TOTAL: b"+", CLOSED: b"c"}
        self._unpack = struct.Struct("<q").unpack

    def _fetch_add(self, which: int, value: int) -> int:
        self._socket.sendall(self._struct.pack(self._ops[which], value))
        reply = b""
        while len(reply) < self._reply.size:
            chunk = self._socket.recv(self._reply.size - len(reply))
            if not chunk:
                raise RuntimeError("asynchronous mode: the step counter on rank 0 has gone away")
            reply += chunk
        return self._reply.unpack(reply)[0]

    def free(self) -> None:
        self.comm.Barrier()
        self._socket.close()
        if self._server is not None:
            self._server.stdin.close()
            self._server.wait(timeout=30)
        self.comm.Free()


def _own_addresses() -> list:
    """This host's IPv4 addresses other than loopback: where the other ranks may reach it."""
    import psutil

    found = [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
             if a.family.name == "AF_INET" and not a.address.startswith("127.")]
    return found


def make_step_counter(comm=None) -> GlobalStepCounter:
    """The MPI window when every rank shares one node (or HOROVOD_LEADER_STEP_COUNTER=mpi);
    the TCP server otherwise (or HOROVOD_LEADER_STEP_COUNTER=tcp), and always on the torch
    engine, which has no MPI."""
    import os

    from horovod_leader import engine
    from horovod_leader.launcher import require_mpi

    if engine.name() == "torch":  # no MPI: the TCP server, reached over the torch engine's group
        return TcpStepCounter(engine.TorchWorld(engine.active()))
    require_mpi("asynchronous mode (asynchronous=True, --async)")
    from mpi4py import MPI

    world = MPI.COMM_WORLD if comm is None else comm
    choice = os.environ.get("HOROVOD_LEADER_STEP_COUNTER", "auto").strip().lower()
    if choice not in ("auto", "mpi", "tcp"):
        raise ValueError(f"HOROVOD_LEADER_STEP_COUNTER must be auto, mpi or tcp, got {choice!r}")
    if choice == "auto":
        node = world.Split_type(MPI.COMM_TYPE_SHARED)
        one_node = node.Get_size() == world.Get_size()
        node.Free()
        choice = "mpi" if one_node else "tcp"
    return GlobalStepCounter(comm) if choice == "mpi" else TcpStepCounter(comm)


RefreshGenerator = Generator[Iterable, None, None]


class _Hold:
    """Yielded by a round where an overlapped round waits for the step it applies at."""

    def __iter__(self):  # a hold posts no collective
        return iter(())

    def __repr__(self) -> str:
        return "HOLD"


#: what a round generator yields between computing its outcome and applying it
HOLD = _Hold()


class Together(list):
    """Handles that every member posts at the same point of a synchronous round (an in-node
    exchange at the round's start): an overlapped round waits for them at once, which costs
    little over shared memory and lets the next phase, the one on the links, start now
    rather than at the next step's poll. Elsewhere (asynchronous rounds) a plain list."""


class RefreshDriver:
    """Runs one refresh generator at a time, resuming it when its collectives have finished.

    A refresh generator yields the handles of the collectives it posted and receives their
    results (``hvd.synchronize`` of each, which also frees the handles) when it resumes. A
    round may also yield ``HOLD`` right before it applies its outcome: a round started with
    ``hold=True`` (an overlapped round) stops there until ``progress(release=True)``, so that
    every rank applies it at the same step; otherwise ``HOLD`` passes at once.
    """

    def __init__(self):

        self._gen: Optional[RefreshGenerator] = None
        self._handles: tuple = ()
        self._hold = False
        self._together = False  # the pending handles are a ``Together`` of an overlapped round
        self.held = False  # the round in flight has reached its HOLD
        self.result = None  # what the last finished refresh generator returned

    @property
    def busy(self) -> bool:
        return self._gen is not None

    def start(self, gen: RefreshGenerator, block: bool = False, hold: bool = False) -> None:
        if self._gen is not None:
            raise RuntimeError("a refresh is already in progress")
        self._gen, self._hold, self.held = gen, hold, False
        self._resume(None)
        self.progress(block=block)

    def progress(self, block: bool = False, release: bool = False) -> bool:
        """Resume the refresh while its collectives are done (all of them when ``block``); a
        held round goes past its ``HOLD`` only with ``release``. True when nothing is pending."""
        from horovod_leader.comm import poll, synchronize

        while self._gen is not None:
            if self.held:
                if not release:
                    return False
                self.held = False
                self._resume(None)
                continue
            if not (block or self._together) and not all(poll(h) for h in self._handles):
                return False
            self._resume([synchronize(h) for h in self._handles])
        return True

    def abandon(self) -> None:
        """Drop a round held at its ``HOLD`` (its collectives are done) without applying it."""
        if self._gen is not None:
            if not self.held:
                raise RuntimeError("only a round held at its HOLD can be abandoned: its collectives are still running")
            self._gen.close()
        self._gen, self._handles, self.held, self._together = None, (), False, False

    def _resume(self, results) -> None:
        try:
            out = self._gen.send(results)
            while out is HOLD and not self._hold:
                out = self._gen.send(None)
            self.held = out is HOLD
            self._together = self._hold and isinstance(out, Together)
            self._handles = () if self.held else tuple(out)
        except StopIteration as finished:
            self._gen, self._handles, self.result, self.held = None, (), finished.value, False
        except BaseException:
            # The refresh raised (e.g. every worker diverged): nothing is left in flight.
            self._gen, self._handles, self.held = None, (), False
            raise


class AsyncSchedule:
    """Which refresh rounds are due, from the global total; and the closing protocol.

    Round n (n = 1, 2, ...) is due once the total reaches ``n * unit`` global steps.
    """

    def __init__(self, unit: int, counter: GlobalStepCounter, driver: RefreshDriver):
        self.unit = unit
        self.counter = counter
        self.driver = driver
        self.rounds_started = 0
        self.last_total = 0
        self.history = []  # (round, global total, this rank's steps) when this rank started it
        self.started_during_training: Optional[int] = None  # rounds started before close()
        self.waits = 0  # how often this rank waited for its round so as not to fall behind
        self.wait_seconds = 0.0

    def after_step(self, start_round: Callable[[int], RefreshGenerator], local_steps: int) -> None:
        """Count this step, advance the in-flight round, start every due round it may."""
        self.last_total = self.counter.add_step()
        self._advance(start_round, local_steps)

    def _advance(self, start_round, local_steps: int) -> None:
        while True:
            self.driver.progress()
            due = self.last_total // self.unit
            if self.driver.busy:
                if due <= self.rounds_started:
                    return  # the round in flight is the newest due: keep computing meanwhile
                # The next round is due and this one is still in flight: wait for it rather
                # than fall further behind (this bounds staleness by one round).
                began = time.perf_counter()
                self.driver.progress(block=True)
                self.waits += 1
                self.wait_seconds += time.perf_counter() - began
                self.last_total = self.counter.total()  # others stepped while this rank waited
            elif due > self.rounds_started:
                self.rounds_started += 1
                self.history.append((self.rounds_started, self.last_total, local_steps))
                self.driver.start(start_round(self.rounds_started))
            else:
                return

    def close(self, start_round: Callable[[int], RefreshGenerator], local_steps: int,
              poll_seconds: float = 0.001) -> None:
        """Keep joining due refreshes until every rank has closed and the last one is done."""
        size = self.counter.size
        self.started_during_training = self.rounds_started
        self.counter.close()
        while True:
            # Closed count first: once it reads `size`, every step was counted before, so the
            # total read next is final and every rank computes the same last round.
            everyone_closed = self.counter.closed() == size
            self.last_total = self.counter.total()
            self._advance(start_round, local_steps)
            if everyone_closed and not self.driver.busy and self.last_total < (self.rounds_started + 1) * self.unit:
                break
            time.sleep(poll_seconds)
        self.counter.free()
