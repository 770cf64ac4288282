"""Asynchronous scheduling: a global step count without per-step synchronisation.

The papers' asynchronous algorithms (LSGD's Algorithm 1, GRAWA's asynchronous variants) count
the steps of *all* workers together: a refresh is due whenever the total crosses a multiple
of ``size * period``, so a fast worker takes more steps between refreshes than a slow one.

Design, in three pieces:

* ``GlobalStepCounter``: two integers in an MPI window on rank 0 (total steps, closed ranks).
  Each step does one atomic ``MPI_Fetch_and_op`` (one-sided: rank 0 does not take part, and
  no other rank waits), which returns the new total.
* ``RefreshDriver``: a refresh is written as a generator that posts Horovod *non-blocking*
  collectives and yields their handles. The driver resumes it when ``hvd.poll`` says they are
  done, so the worker keeps computing while the slower workers catch up and join; the pull is
  applied as soon as the data has arrived. Driven with ``block=True`` the same generator is
  the synchronous refresh.
* Staleness is bounded: a worker starts refresh n+1 only after refresh n has completed on it,
  so a pull uses parameters at most one refresh interval (``size * period`` global steps) old.

Shutdown: ``close()`` increments the closed count, then keeps joining every refresh that the
total makes due until every rank has closed. All ranks then see the same final total and join
the same last refresh, so no rank waits in a collective for one that has left, and the final
refresh is not lost.
"""
from __future__ import annotations

import time
from typing import Callable, Generator, Iterable, Optional

import numpy as np

TOTAL, CLOSED = 0, 1


class GlobalStepCounter:
    """Atomic counters shared by all ranks, advanced with one-sided MPI operations."""

    def __init__(self, comm=None):
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

    def free(self) -> None:
        self.comm.Barrier()
        self.window.Free()
        self.comm.Free()


RefreshGenerator = Generator[Iterable, None, None]


class RefreshDriver:
    """Runs one refresh generator at a time, resuming it when its collectives have finished.

    A refresh generator yields the handles of the collectives it posted and receives their
    results (``hvd.synchronize`` of each, which also frees the handles) when it resumes.
    """

    def __init__(self):
        import horovod.torch as hvd

        self._hvd = hvd
        self._gen: Optional[RefreshGenerator] = None
        self._handles: tuple = ()
        self.result = None  # what the last finished refresh generator returned

    @property
    def busy(self) -> bool:
        return self._gen is not None

    def start(self, gen: RefreshGenerator, block: bool = False) -> None:
        if self._gen is not None:
            raise RuntimeError("a refresh is already in progress")
        self._gen = gen
        self._resume(None)
        self.progress(block=block)

    def progress(self, block: bool = False) -> bool:
        """Resume the refresh while its collectives are done; True when nothing is pending."""
        while self._gen is not None:
            if not block and not all(self._hvd.poll(h) for h in self._handles):
                return False
            self._resume([self._hvd.synchronize(h) for h in self._handles])
        return True

    def _resume(self, results) -> None:
        try:
            self._handles = tuple(self._gen.send(results))
        except StopIteration as finished:
            self._gen, self._handles, self.result = None, (), finished.value


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

    def after_step(self, start_round: Callable[[int], RefreshGenerator], local_steps: int) -> None:
        """Count this step, advance the pending refresh, start the next one if due."""
        self.last_total = self.counter.add_step()
        self._poll(start_round, local_steps)

    def _poll(self, start_round, local_steps: int) -> None:
        self.driver.progress()
        if not self.driver.busy and self.last_total >= (self.rounds_started + 1) * self.unit:
            self.rounds_started += 1
            self.history.append((self.rounds_started, self.last_total, local_steps))
            self.driver.start(start_round(self.rounds_started))

    def close(self, start_round: Callable[[int], RefreshGenerator], local_steps: int,
              poll_seconds: float = 0.001) -> None:
        """Keep joining due refreshes until every rank has closed and the last one is done."""
        size = self.counter.comm.Get_size()
        self.counter.close()
        while True:
            # Closed count first: once it reads `size`, every step was counted before, so the
            # total read next is final and every rank computes the same last round.
            everyone_closed = self.counter.closed() == size
            self.last_total = self.counter.total()
            self._poll(start_round, local_steps)
            if everyone_closed and not self.driver.busy and self.last_total < (self.rounds_started + 1) * self.unit:
                break
            time.sleep(poll_seconds)
        self.counter.free()
