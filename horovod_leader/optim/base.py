"""The wrapper contract: what every distributed optimizer wrapper is and shares.

A wrapper holds a ``torch.optim.Optimizer`` (the gradient force) and the model, by
composition. It packs the model's parameters (and buffers) into flat buffers once, counts
steps, talks through one ``Collectives`` object (which counts ``comm_bytes``), checks at
construction that every rank wraps the same model with the same settings, and offers
``close()`` / ``with opt:``, ``centre()`` and ``state_dict()``. ``docs/architecture.md``
walks through writing one.
"""
from __future__ import annotations

import abc
import hashlib
from dataclasses import dataclass
import logging
from typing import Any, Dict, List, Optional

import torch

from horovod_leader import abort
from horovod_leader.comm import Collectives
from horovod_leader.errors import AllWorkersDiverged
from horovod_leader.packing import FlatBuffer, key_name, pack
from horovod_leader.health import NonFiniteAtStart
from horovod_leader.topology import Topology

log = logging.getLogger("horovod_leader")

# How many parameters and submodules any module has registered since the first wrapper was
# built (global registration hooks): a wrapper walks its model only when this moved.
_registrations = [0]


def _watch_registrations() -> None:
    if getattr(_watch_registrations, "installed", False):
        return

    def count(*_args):
        _registrations[0] += 1

    torch.nn.modules.module.register_module_parameter_registration_hook(count)
    torch.nn.modules.module.register_module_module_registration_hook(count)
    _watch_registrations.installed = True


def model_signature(model: torch.nn.Module) -> str:
    """A short digest of every parameter's and buffer's name, shape and dtype."""
    parts = [f"p:{name}:{tuple(t.shape)}:{t.dtype}" for name, t in model.named_parameters()]
    parts += [f"b:{name}:{tuple(t.shape)}:{t.dtype}" for name, t in model.named_buffers()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16] + f"/{len(parts)}"


def _refuse_overlap_with_async(overlap, asynchronous) -> None:
    if asynchronous is True and not (isinstance(overlap, int) and overlap == 0):
        raise ValueError(f"overlap={overlap!r} is for synchronous rounds: asynchronous rounds already run while the "
                         "workers step (give overlap=0 with asynchronous=True)")


_NAMED = "__named_buffers__"


def _pack(value):
    """A round's outcome as plain data: dicts keyed by packed-buffer keys become
    ``{"__named_buffers__": {name: tensor}}``; tensors are copied."""
    if isinstance(value, dict):
        if value and all(isinstance(k, tuple) and len(k) == 2 and isinstance(k[0], torch.dtype) for k in value):
            return {_NAMED: {key_name(k): _pack(v) for k, v in value.items()}}
        return {k: _pack(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_pack(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    return value


def _unpack(value, keys: Dict[str, Any], device):
    """``_pack``'s inverse, tensors moved to ``device`` (the model's)."""
    if isinstance(value, dict):
        if set(value) == {_NAMED}:
            return {keys[name]: _unpack(v, keys, device) for name, v in value[_NAMED].items()}
        return {k: _unpack(v, keys, device) for k, v in value.items()}
    if isinstance(value, list):
        return [_unpack(v, keys, device) for v in value]
    if isinstance(value, torch.Tensor):
        return value.to(device)
    return value


@dataclass
class InFlight:
    """An overlapped round: posted at its round's step, applied ``overlap`` steps later.

    Attributes:
        number: the round's number.
        apply_at: the step (``steps``) at which every rank applies it.
        snapshot: what was sent, ``{"params": {key: flat}, "buffers": {key: flat}}``: the
            corrections are computed from it.
        header: the handle of the round's announcement (``round.header``), or None.
    """

    number: int
    apply_at: int
    snapshot: Dict[str, Dict[Any, torch.Tensor]]
    header: Any = None


def scalar_loss(loss) -> Any:
    """Accept a 0-d (or one-element) tensor or a real number as this rank's loss."""
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise ValueError(f"loss must be a scalar (0-d tensor or float), got a tensor of shape {tuple(loss.shape)}")
        return loss.detach().reshape(())
    if isinstance(loss, bool) or not isinstance(loss, (int, float)):
        raise ValueError(f"loss must be a scalar (0-d tensor or float), got {type(loss).__name__}")
    return float(loss)


class DistributedWrapper(abc.ABC):
    """The base of every wrapper (LSGD, GRAWA, EASGD, OneSidedEASGD, LocalSGD, DiLoCo,
    DataParallel). A subclass provides:

    * ``name``: used in Horovod collective names and in logs;
    * its constructor: validate its own arguments (no communication), set them, then call
      ``super().__init__(optimizer, model, period=..., ...)``, which checks, packs and
      compares the model and ``_settings()`` across ranks;
    * ``step(loss)``: the wrapped optimizer's step and, when due, a round;
    * ``_round(number, joined)``: one round, as a generator of posted collectives (see
      ``horovod_leader.async_schedule``): it yields the handles it posted and receives their
      results. ``joined``: this rank has closed and only takes part;
    * ``_settings()``: the settings every rank must give alike;
    * ``_state()`` / ``_load_state(state)``: its own state, tensors keyed by buffer name
      (``_named`` / ``_restore_named``);
    * ``centre()``, when the method keeps a centre of its own.

    Args:
        optimizer: the wrapped optimizer (the gradient force), over ``model``'s parameters.
        model: the model; its parameters and buffers are packed into flat buffers (values
            unchanged). Move it to its device before wrapping.
        period: steps between rounds, an integer >= 1.
        topology: a ``Topology`` from ``horovod_leader.init``; default: the current one.
        broadcast_buffers: whether buffers (batch-norm statistics) take part in the rounds.

    Raises:
        ValueError: on every rank, before any collective, for a bad argument; on every rank
            together when ranks wrap different models or disagree on a setting.
    """

    #: used in Horovod collective names and in logs
    name = "wrapper"
    #: synchronous rounds are announced by a ``round.header`` all-reduce, which ranks that closed
    #: early wait for (``_join_rounds``); LSGD announces its refreshes in its score rows instead
    _announces_rounds = True
    #: whether the rounds average or broadcast through the nodes' first ranks when the topology
    #: is node-aware (``Topology.node_sets``: built, collectively, at construction)
    _uses_node_sets = False

    def __init__(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module, *, period: int,
                 topology: Optional[Topology] = None, broadcast_buffers: bool = True, overlap: int = 0):
        from horovod_leader.validation import check_int

        self.period = check_int("period", period)
        self.overlap = check_int("overlap", overlap, minimum=0)
        if self.overlap >= self.period:
            raise ValueError(f"overlap={self.overlap} must be smaller than period={self.period}: a round is applied "
                             "before the next one starts")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(broadcast_buffers, bool):
            raise ValueError(f"broadcast_buffers must be True or False, got {broadcast_buffers!r}")
        model_params = {id(p) for p in model.parameters()}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in model_params:
                    raise ValueError("optimizer holds a parameter that is not in model: wrap the model whose "
                                     "parameters the optimizer updates")
        self.optimizer = optimizer
        self.model = model
        self.broadcast_buffers = broadcast_buffers
        self._topology = topology
        self._steps = 0
        self._closed = False
        self.recoveries = 0  # how many times this worker was reset after diverging
        self._reset_since_step = False
        self.asynchronous = False
        self._schedule = None  # an AsyncSchedule in asynchronous mode (see _setup_rounds)
        self._in_flight: Optional[InFlight] = None  # an overlapped round, posted, to be applied later
        self._pending_outcome: Any = None  # what the round in flight will apply (for state_dict)
        for what, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if tensor.dtype == torch.bfloat16 and tensor.device.type != "cuda":
                raise ValueError(f"model: {what!r} is bfloat16 on {tensor.device}, which Horovod cannot send "
                                 "(it refuses bfloat16 tensors on the CPU); keep the master weights in float32 "
                                 "(torch.autocast for bfloat16 compute) or move the model to a GPU")
            if tensor.is_complex():
                raise ValueError(f"model: {what!r} is {tensor.dtype}; the wrappers average and pull real floating "
                                 "tensors only: store it as a real tensor of twice the size (torch.view_as_real)")
        abort.install_excepthook()  # one rank's uncaught exception ends the job, not just that rank
        _watch_registrations()
        # Everything above is local; from here on ranks communicate.
        self.comm = Collectives(self.name)
        self._check_agreement()
        # Only floating parameters take part in the method. The others (int8 quantised weights,
        # say) cannot require gradients, so they are frozen: every wrapper leaves them alone.
        self.params: Dict[Any, FlatBuffer] = pack(p for p in model.parameters() if p.is_floating_point())
        float_buffers = [b for b in model.buffers() if b.is_floating_point()] if broadcast_buffers else []
        other_buffers = [b for b in model.buffers() if not b.is_floating_point()] if broadcast_buffers else []
        self.float_buffers: Dict[Any, FlatBuffer] = pack(float_buffers)
        # Buffers that are not floating point (bool masks, integer counters) are never cast,
        # averaged or pulled: they are copied from the source of the round (see the subclasses).
        self.other_buffers: Dict[Any, FlatBuffer] = pack(other_buffers)
        # Non-finite values a buffer held from the start (an additive -inf mask) are not divergence.
        self._constants = NonFiniteAtStart(("fbuf." + key_name(k), f.flat) for k, f in self.float_buffers.items())
        self._registrations_seen = _registrations[0]
        self._model_param_ids = tuple(id(p) for p in model.parameters())
        self._group_sizes = self._optimizer_layout()
        device = next((flat.device for flat in self.params.values()), torch.device("cpu"))
        self._nodes = self.topology.node_sets(device) if self._uses_node_sets else None

    # ------------------------------------------------------------------ topology and checks
    @property
    def topology(self) -> Topology:
        if self._topology is None:
            from horovod_leader.topology import current
            self._topology = current()
        return self._topology

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def size(self) -> int:
        return self.comm.size

    def _settings(self) -> Dict[str, Any]:
        """The constructor's settings that every rank must give alike (compared at
        construction by ``_check_agreement``); subclasses add theirs."""
        return {"wrapper": type(self).__name__, "broadcast_buffers": self.broadcast_buffers, "overlap": self.overlap}

    def _check_agreement(self) -> None:
        """Every rank must wrap the same architecture with the same settings: one all-gather of
        the model's digest and ``_settings()``; every rank raises alike, naming what differs."""
        mine = {"model": model_signature(self.model), **self._settings()}
        everyone = self.comm.allgather_object(mine, name="model_signature")
        problems = []
        for key in mine:
            values = [theirs.get(key) for theirs in everyone]
            if all(v == values[0] for v in values):
                continue
            by_value: Dict[str, List[int]] = {}
            for rank, v in enumerate(values):
                by_value.setdefault(repr(v), []).append(rank)
            seen = "; ".join(f"ranks {ranks} have {v}" for v, ranks in by_value.items())
            if key == "model":
                odd = [rank for rank, v in enumerate(values) if v != values[0]]
                problems.append(f"model differs across ranks: ranks {odd} have parameters or buffers whose names, "
                                f"shapes or dtypes differ from rank 0's (signatures {sorted(set(values))})")
            else:
                problems.append(f"{key} differs across ranks: {seen}")
        if problems:
            raise ValueError("; ".join(problems) + f" ({type(self).__name__}: every rank must build the wrapper alike)")

    def _optimizer_layout(self):
        return tuple(len(group["params"]) for group in self.optimizer.param_groups)

    def _check_unchanged(self) -> None:
        """Stop, naming the change, when the optimizer's groups or the model's parameters differ
        from what the wrapper was built with: the wrapper exchanges (and, on the fused path,
        steps) only the parameters it packed then. Costs a few lengths per step; the model is
        walked only after some module registered a parameter or a submodule somewhere."""
        fix = ("build the wrapper once the model and the optimizer are complete, or, to change them in the middle "
               "of a run, save state_dict()s, build a new wrapper around the changed model and optimizer, and load "
               "them")
        if self._optimizer_layout() != self._group_sizes:
            raise RuntimeError(f"{type(self).__name__}: the optimizer's param groups changed after the wrapper was "
                               f"built (parameters per group {list(self._group_sizes)} then, "
                               f"{list(self._optimizer_layout())} now, e.g. add_param_group); {fix}")
        if _registrations[0] != self._registrations_seen:
            self._registrations_seen = _registrations[0]
            now = tuple(id(p) for p in self.model.parameters())
            if now != self._model_param_ids:
                raise RuntimeError(f"{type(self).__name__}: the model's parameters changed after the wrapper was "
                                   f"built ({len(self._model_param_ids)} parameter tensors then, {len(now)} now, "
                                   f"e.g. a layer added or replaced); {fix}")

    def _check_packed(self) -> None:
        for flat in list(self.params.values()) + list(self.float_buffers.values()) + list(self.other_buffers.values()):
            if not flat.still_packed():
                raise RuntimeError(f"{type(self).__name__}: the model's parameters or buffers were re-allocated after "
                                   "wrapping (for example by model.to()); move the model before wrapping it")

    def _params_finite(self) -> bool:
        return all(bool(torch.isfinite(flat.flat).all()) for flat in self.params.values())

    def _healthy(self) -> bool:
        """Finite parameters and floating buffers: only such a worker may enter an average.
        A buffer's values that were non-finite from the start, and still are the same, do
        not count (``horovod_leader.health``)."""
        return self._params_finite() and all(self._constants.finite("fbuf." + key_name(key), flat.flat)
                                             for key, flat in self.float_buffers.items())

    def _may_contribute(self) -> bool:
        """Healthy, and stepped since its last reset. A worker just reset to the centre (or a
        leader's copy) has nothing of its own to add; letting it count would keep a centre alive
        out of resets alone when in truth every worker keeps diverging."""
        return not self._reset_since_step and self._healthy()

    def _all_diverged(self, detail: str = "") -> AllWorkersDiverged:
        """The error every rank raises when a round finds no healthy worker."""
        return AllWorkersDiverged(type(self).__name__, self._steps, detail)

    def _log_recovery(self, source: str) -> None:
        """A diverged worker was reset to ``source``: log it and restart its optimizer state."""
        log.warning("horovod_leader: rank %d diverged (non-finite loss, gradient or parameters) at step %d; "
                    "reset to %s", self.rank, self._steps, source)
        self.optimizer.state.clear()
        self.recoveries += 1
        self._reset_since_step = True

    def _exchanged(self) -> Dict[str, FlatBuffer]:
        """Every packed buffer (parameters, floating and other buffers) by a rank-independent name."""
        out = {"param." + key_name(k): f for k, f in self.params.items()}
        out.update({"fbuf." + key_name(k): f for k, f in self.float_buffers.items()})
        out.update({"obuf." + key_name(k): f for k, f in self.other_buffers.items()})
        return out

    # ------------------------------------------------------------------ common API
    @property
    def comm_bytes(self) -> int:
        """Payload bytes of every collective this rank has joined through this wrapper."""
        return self.comm.bytes

    @property
    def steps(self) -> int:
        """Number of ``step()`` calls so far."""
        return self._steps

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @property
    def param_groups(self) -> List[dict]:
        """The wrapped optimizer's param groups (the same dicts). LR schedulers take the wrapped
        optimizer itself: ``StepLR(opt.optimizer, ...)`` (a wrapper is not a
        ``torch.optim.Optimizer``); so does ``hvd.broadcast_optimizer_state(opt.optimizer, 0)``."""
        return self.optimizer.param_groups

    def broadcast_optimizer_state(self, root_rank: int = 0) -> None:
        """Give every rank the wrapped optimizer's state and hyperparameters of ``root_rank``.

        Unlike ``hvd.broadcast_optimizer_state``, which takes a zero-gradient step to create the
        state of a fresh optimizer (applying its weight decay to the parameters, and leaving
        Adam's step count at 1), this sends ``optimizer.state_dict()`` itself (one
        ``broadcast_object``) and loads it: no parameter changes, and a fresh optimizer on the
        root leaves every rank's optimizer fresh.

        Raises:
            ValueError: on every rank, before any collective, when ``root_rank`` is not a rank.
        """
        from horovod_leader.validation import check_int

        check_int("root_rank", root_rank, minimum=0)
        if root_rank >= self.size:
            raise ValueError(f"root_rank must be a rank of this job (0..{self.size - 1}), got {root_rank}")
        state = self.comm.broadcast_object(self.optimizer.state_dict() if self.rank == root_rank else None,
                                           root_rank, name="optimizer_state")
        self.optimizer.load_state_dict(state)

    def _begin_step(self, loss):
        """What every ``step`` starts with: check the loss and the packing, count the step."""
        if loss is not None:
            loss = scalar_loss(loss)
        self._check_packed()
        self._check_unchanged()
        self._steps += 1
        self._reset_since_step = False
        return loss

    # ------------------------------------------------------------------ refresh rounds
    def _setup_rounds(self, asynchronous: bool, steps_per_round: int) -> None:
        """Synchronous rounds run at once; asynchronous ones are scheduled on the global step
        count, one round per ``size * steps_per_round`` steps of all ranks together."""
        from horovod_leader.async_schedule import AsyncSchedule, RefreshDriver, make_step_counter

        from horovod_leader.optim.averaging import MeanRound

        self.asynchronous = asynchronous
        self._driver = RefreshDriver()
        if asynchronous:  # the centre's snapshots (see request_centre)
            self._centre_comm = Collectives(self.name + ".centre")  # not counted in comm_bytes
            self._centre_mean, self._centre_due, self._centre_wanted = MeanRound(), False, False
            self._centre_flag = torch.zeros(1, dtype=torch.float64)
            self._centre_snapshot = None
        self._schedule = (AsyncSchedule(self.size * steps_per_round, make_step_counter(self.topology.world_comm),
                                        self._driver)
                          if asynchronous else None)

    def _average(self, mean, number: int, joined: bool, refs: Optional[Dict] = None, what: str = "averaging round"):
        """The mean round of the averaging methods (a generator, for ``yield from``): post
        ``mean``'s collectives (a ``MeanRound``: the healthy workers' parameters and floating
        buffers, rank 0's other buffers) and turn the sums into means; returns the outcome that
        ``_apply_mean`` applies. Every rank raises ``AllWorkersDiverged`` when no worker is healthy."""
        healthy = self._healthy()
        count = yield from mean.run(self.comm, self._nodes, self.params, self.float_buffers,
                                    self._may_contribute() and not joined, refs=refs, others=self.other_buffers)
        return {"healthy": healthy, "joined": joined, "params": mean.params, "buffers": mean.buffers,
                "others": mean.others.incoming if self.other_buffers else {},
                "diverged": None if count else f"{what} {number}"}

    def _apply_mean(self, outcome: Dict[str, Any]) -> bool:
        """The common part of applying a mean round: every rank raises ``AllWorkersDiverged``
        when no worker was healthy (at the step the round applies, overlapped or not); rank
        0's other buffers are adopted (``_adopt_others``); returns whether this worker must be
        reset (it was not healthy when the round was posted, or, overlapped, is not now)."""
        if outcome.get("diverged"):
            raise self._all_diverged(outcome["diverged"])
        self._adopt_others(outcome["others"])
        return not outcome["healthy"] or (self._in_flight is not None and not self._healthy())

    def _adopt_others(self, targets: Dict[Any, torch.Tensor]) -> None:
        r"""The buffers that are not floating point take the round's source's values; overlapped,
        an integer counter keeps the steps taken meanwhile, :math:`x \leftarrow c + (x - s)`
        (batch norm's ``num_batches_tracked``), and a bool mask is copied."""
        snapshot = self._snapshot("others")
        with torch.no_grad():
            for key, flat in self.other_buffers.items():
                if snapshot is None or flat.flat.dtype == torch.bool:
                    flat.flat.copy_(targets[key])
                else:
                    flat.flat.add_(targets[key] - snapshot[key])

    @abc.abstractmethod
    def step(self, loss=None) -> None:
        """One step: the wrapped optimizer's, then a round when one is due. Call it after
        ``loss.backward()``, with this rank's loss (a 0-d tensor or a float; LSGD needs it)."""

    @abc.abstractmethod
    def _round(self, number: int, joined: bool = False):
        """Round ``number`` (1, 2, ...) as a generator of posted collectives: it yields the
        handles it posted and receives their results (``async_schedule.RefreshDriver``), so
        the same code serves the synchronous and the asynchronous modes. ``joined``: this
        rank has closed; it takes part in the collectives, adds nothing and is not pulled."""

    def centre(self) -> Optional[Dict[Any, torch.Tensor]]:
        """The centre variable the method keeps, ``{key: flat tensor}`` keyed like
        ``params`` (EASGD's centre, DiLoCo's outer parameters, the one-sided EASGD's shards),
        or None when the method's centre is the workers' average, which evaluation computes
        with a collective (LSGD, GRAWA, local SGD, data-parallel SGD). The tensors are the
        wrapper's own: copy them before changing them."""
        return None

    # ------------------------------------------------------------------ the centre of asynchronous runs
    def request_centre(self) -> None:
        """Asynchronous mode: ask for a snapshot of the workers' average at an upcoming round.

        No collective may run between asynchronous rounds, so the average is taken where the
        workers already meet, as the authors test right after a communication round: the
        request rides in the next round (a one-number all-reduce that every round carries),
        and the round after it also all-reduces the parameters and floating buffers of the
        healthy workers. ``take_centre()`` then returns it on every rank. Cost: 8 bytes per
        round, and one all-reduce of the parameters (P) and floating buffers per snapshot;
        neither is counted in ``comm_bytes``.
        """
        if hasattr(self, "_centre_flag"):  # a wrapper with asynchronous rounds
            self._centre_wanted = True

    def take_centre(self) -> Optional[Dict[str, Dict[Any, torch.Tensor]]]:
        """The snapshot of the workers' average that arrived since the last call, or None:
        ``{"params": {key: flat mean}, "buffers": {key: flat mean}}`` keyed like ``params``
        and ``float_buffers`` (float32 for half-precision models)."""
        snapshot, self._centre_snapshot = getattr(self, "_centre_snapshot", None), None
        return snapshot

    def _async_round(self, number: int):
        """An asynchronous round: the method's ``_round`` with the centre's collectives added
        to its first exchange (see ``request_centre``)."""
        self._centre_flag.fill_(1.0 if self._centre_wanted else 0.0)
        self._centre_wanted = False
        extra = [self._centre_comm.allreduce_async_(self._centre_flag, name="request")]
        snapshot = self._centre_due
        if snapshot:
            extra += self._centre_mean.post(self._centre_comm, self.params, self.float_buffers, self._may_contribute())
        inner = self._round(number)
        try:
            handles = list(next(inner))
        except StopIteration as finished:  # a round that posts nothing of its own
            handles, inner = [], None
            value = finished.value
        results = yield handles + extra
        own, mine = results[:len(handles)], results[len(handles):]
        self._centre_due = float(mine[0]) > 0
        if snapshot and self._centre_mean.finish(mine[1:]):
            self._centre_snapshot = {"params": {k: t.clone() for k, t in self._centre_mean.params.items()},
                                     "buffers": {k: t.clone() for k, t in self._centre_mean.buffers.items()}}
        if inner is None:
            return value
        while True:
            try:
                handles = inner.send(own)
            except StopIteration as finished:
                return finished.value
            own = yield handles

    def _step_then_round(self, loss) -> None:
        """The wrapped optimizer's step, then a round every ``self.period`` steps (synchronous)
        or the step counted toward the global schedule (asynchronous)."""
        self._begin_step(loss)
        self.optimizer.step()
        if self.asynchronous:
            self._schedule.after_step(self._async_round, self._steps)
            return
        self._advance_in_flight()
        if self._steps % self.period == 0:
            self._start_round(self._steps // self.period)

    # ------------------------------------------------------------------ overlapped rounds
    def _start_round(self, number: int) -> None:
        """A synchronous round at this step: applied before ``step`` returns (``overlap`` 0),
        or posted now and applied ``overlap`` steps later (``InFlight``)."""
        if not self.overlap:
            self._run_round(number)
            return
        announced = None
        if self._announces_rounds:
            announced = self.comm.allreduce_async_(torch.ones(1, dtype=torch.float64), name="round.header")
        snapshot = {which: {key: flat.flat.clone() for key, flat in flats.items()}
                    for which, flats in (("params", self.params), ("buffers", self.float_buffers),
                                         ("others", self.other_buffers))}
        self._in_flight = InFlight(number, self._steps + self.overlap, snapshot, announced)
        self._driver.start(self._round(number), hold=True)

    def _advance_in_flight(self) -> None:
        """Every synchronous step: an overlapped round in flight makes progress while the worker
        computes, and is applied at its step (waiting there only for what has not arrived)."""
        if self._in_flight is None:
            return
        if self._steps >= self._in_flight.apply_at:
            self._finish_in_flight()
        else:
            self._driver.progress()

    def _finish_in_flight(self) -> None:
        self._driver.progress(block=True, release=True)
        if self._in_flight.header is not None:
            self.comm.wait(self._in_flight.header)
        self._in_flight = None

    def _hold(self, outcome: Dict[str, Any]):
        """Where a round has its outcome and has not applied it (for ``yield from``): an
        overlapped round waits here for its step (``async_schedule.HOLD``); ``state_dict`` saves
        the outcome of a round held here."""
        from horovod_leader.async_schedule import HOLD

        self._pending_outcome = outcome
        yield HOLD
        self._pending_outcome = None

    def _apply(self, outcome: Dict[str, Any]):
        """Apply a round's outcome (the part of ``_round`` after its ``_hold``)."""
        raise NotImplementedError(f"{type(self).__name__} has no overlapped rounds")

    def _resume_held(self, outcome: Dict[str, Any]):
        """A round restored from a checkpoint at its hold: applied at its step."""
        yield from self._hold(outcome)
        return self._apply(outcome)

    def _snapshot(self, which: str) -> Optional[Dict[Any, torch.Tensor]]:
        """The in-flight round's snapshot of the parameters (``"params"``) or floating buffers
        (``"buffers"``), taken when it was posted; None without overlap."""
        return None if self._in_flight is None else self._in_flight.snapshot[which]

    def _correct_(self, flats: Dict[Any, FlatBuffer], targets: Dict[Any, torch.Tensor], pull: float,
                  which: str = "params", reset: bool = False) -> None:
        r"""Move every packed buffer toward its target by ``pull``, as a round prescribes.

        Without overlap, :math:`x \leftarrow x - \lambda (x - c)` (``pull`` 1: :math:`x \leftarrow c`).
        Overlapped, the correction is computed from the snapshot :math:`s` the round sent and
        applied to the current parameters, so the steps taken meanwhile are kept:
        :math:`x \leftarrow x - \lambda (s - c)` (``pull`` 1: :math:`x \leftarrow c + (x - s)`).
        ``reset``: :math:`x \leftarrow c` (a worker that diverged)."""
        from horovod_leader import fused
        from horovod_leader.optim.averaging import pull_toward_

        snapshot = self._snapshot(which)
        for key, flat in flats.items():
            if snapshot is None or reset:
                pull_toward_(flat, targets[key], 1.0 if reset else pull)
                continue
            with torch.no_grad():
                s, c = snapshot[key], targets[key]
                if which == "buffers":  # where s = c, constants included (a -inf mask), x keeps its value
                    shift = (c - s.to(c.dtype)).masked_fill_(s.to(c.dtype) == c, 0.0)
                    flat.flat.copy_(flat.flat.to(c.dtype).add_(shift, alpha=pull))
                elif c.dtype != flat.flat.dtype:  # a float32 centre of a half-precision model
                    x = flat.flat.to(c.dtype)
                    flat.flat.copy_(x.sub_(s.to(c.dtype) - c, alpha=pull))
                elif pull == 1.0:
                    flat.flat.add_(c - s)
                elif pull != 0.0:
                    fused.leader_pull_(flat.flat, None, c, global_pull=pull, anchor=s)

    def _run_round(self, number: int) -> None:
        """A synchronous round: announced, posted, waited and applied before ``step`` returns.

        The announcement is a one-number all-reduce (the count of ranks still stepping) posted
        with the round's own collectives, so it costs no extra wait; ranks that have closed
        early learn from it that a round is on and join it (see ``_join_rounds``).
        """
        header = torch.ones(1, dtype=torch.float64)
        announced = self.comm.allreduce_async_(header, name="round.header")
        self._driver.start(self._round(number), block=True)
        self.comm.wait(announced)

    def _join_rounds(self) -> None:
        """Synchronous close: join the rounds of the ranks still stepping, without stepping.

        This rank contributes nothing to any average and never leads; it returns once every
        rank has closed (the announced count of stepping ranks is 0).
        """
        while True:
            header = torch.zeros(1, dtype=torch.float64)
            self.comm.wait(self.comm.allreduce_async_(header, name="round.header"))
            if float(header) == 0.0:
                return
            self._driver.start(self._round(self._steps // self.period, joined=True), block=True)

    @property
    def rounds_history(self):
        """Asynchronous mode: (round, global step total, this rank's steps) when it started each round."""
        return list(self._schedule.history) if self._schedule is not None else []

    def close(self) -> None:
        """Leave the collective schedule: returns on every rank once every rank has closed.

        Call it when this rank stops stepping (``with opt:`` calls it on exit). Ranks may stop
        at different step counts, as with ``hvd.join()``: a rank that closes early keeps
        joining the rounds of the others without stepping (synchronous wrappers: it adds
        nothing to any average and never leads; asynchronous ones: it keeps serving the rounds
        that the global count makes due), and every rank returns once all have closed.
        """
        if self._closed:
            return
        self._closed = True
        if self._in_flight is not None:  # this rank steps no more: its overlapped round applies now
            self._finish_in_flight()
        if self._schedule is not None:
            self._schedule.close(self._async_round, self._steps)
        else:
            self._join_rounds()
        from horovod_leader import engine

        engine.active().join()
        self._free_node_sets()

    def _free_node_sets(self) -> None:
        """Every rank has closed (``hvd.join``): the private in-node communicator is released."""
        from horovod_leader.comm import MPIGroup

        if self._nodes is not None and isinstance(self._nodes.in_node, MPIGroup):
            self._nodes.in_node.comm.Free()
            self._nodes = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Closes; but leaving by an exception ends the whole job (``horovod_leader.abort``):
        entering ``close()`` would leave the other ranks waiting in this step's collectives, or
        training on without this worker as if nothing had happened."""
        if exc_type is not None and abort.enabled():
            abort.abort_job(exc_type, exc, tb)
        self.close()

    #: what of the world (``"size"``, ``"groups"``) the state depends on: it names leaders' ranks,
    #: or holds this rank's shard; a state_dict from a world that differs there is refused
    _state_world_keys: tuple = ()

    def _world(self) -> Dict[str, Any]:
        return {"size": self.size, "groups": [list(g) for g in self.topology.groups]}

    def state_dict(self) -> Dict[str, Any]:
        """The wrapped optimizer's state, the step count, ``comm_bytes``, the world it came
        from (``{"size", "groups"}``) and the method's own state, tensors keyed by buffer name."""
        in_flight = self._in_flight_state() if self._in_flight is not None else None  # first: it may post
        state = {"optimizer": self.optimizer.state_dict(), "steps": self._steps, "comm_bytes": self.comm.bytes,
                 "algorithm": type(self).__name__, "world": self._world(), **self._state()}
        if in_flight is not None:
            state["in_flight"] = in_flight
        return state

    def _in_flight_state(self) -> Dict[str, Any]:
        """An overlapped round in flight, for ``state_dict``: its exchange is completed (the
        collectives every rank posted at its step), and what it will apply is saved with its
        snapshot; it is still applied at its own step, in this run as in a resumed one."""
        flight = self._in_flight
        self._driver.progress(block=True)  # up to the round's hold: its outcome is known
        if flight.header is not None:
            self.comm.wait(flight.header)
            flight.header = None
        return {"number": flight.number, "apply_at": flight.apply_at, "rank": self.rank,
                "snapshot": {which: self._named(tensors) for which, tensors in flight.snapshot.items()},
                "outcome": _pack(self._pending_outcome)}

    def _restore_in_flight(self, saved: Dict[str, Any]) -> None:
        if saved.get("rank", self.rank) != self.rank:
            raise ValueError(f"{type(self).__name__}.load_state_dict: the state_dict holds rank {saved['rank']}'s round "
                             f"in flight (its own snapshot), and this is rank {self.rank}: load each rank's own "
                             "state_dict")
        keys = {key_name(key): key for flats in (self.params, self.float_buffers, self.other_buffers) for key in flats}
        snapshot = {}
        for which, flats in (("params", self.params), ("buffers", self.float_buffers), ("others", self.other_buffers)):
            matched = self._match_named(saved["snapshot"].get(which, {}), flats, "in_flight snapshot")
            # the snapshot keeps the model's dtype, on the model's device
            snapshot[which] = {key: flats[key].like().copy_(tensor) for key, tensor in matched.items()}
        self._in_flight = InFlight(int(saved["number"]), int(saved["apply_at"]), snapshot)
        device = next((flat.device for flat in self.params.values()), torch.device("cpu"))
        self._driver.start(self._resume_held(_unpack(saved["outcome"], keys, device)), hold=True)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore ``state_dict()``'s output.

        Raises:
            ValueError: on every rank alike, when ``state`` is not this wrapper's kind (another
                wrapper's, an optimizer's), lacks a part, names a buffer this model does not
                have, or comes from another world where the state depends on it.
        """
        self._load_base_state(state, required=self._required_state)
        if self._in_flight is not None:  # a round of this run in flight: its exchange completes, unapplied
            self._driver.progress(block=True)
            self._driver.abandon()
            self._in_flight = None
        self._load_state(state)
        if state.get("in_flight") is not None:
            self._restore_in_flight(state["in_flight"])

    #: the keys of ``_state()`` that ``load_state_dict`` requires
    _required_state: tuple = ()

    def _state(self) -> Dict[str, Any]:
        """The method's own part of ``state_dict()``."""
        return {}

    def _load_state(self, state: Dict[str, Any]) -> None:
        """Restore ``_state()``'s part."""

    def _named(self, tensors: Dict[Any, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """``{buffer name: a copy}`` for tensors keyed like the packed buffers."""
        return {key_name(key): tensor.detach().clone() for key, tensor in tensors.items()}

    def _match_named(self, saved, flats: Dict[Any, FlatBuffer], what: str) -> Dict[Any, torch.Tensor]:
        """``{key: tensor}`` from ``saved`` (``_named``'s output), keys matched by name. A name
        this model does not have is refused; a list (positional, from older versions) is
        matched in packing order."""
        if isinstance(saved, (list, tuple)):
            saved = {key_name(key): tensor for key, tensor in zip(flats, saved)}
        names = {key_name(key): key for key in flats}
        unknown = sorted(set(saved) - set(names))
        if unknown:
            raise ValueError(f"{type(self).__name__}.load_state_dict: {what} holds buffers {unknown} that this model "
                             f"does not have (it has {sorted(names)})")
        return {names[name]: tensor for name, tensor in saved.items()}

    def _restore_named(self, saved, flats: Dict[Any, FlatBuffer], what: str, into: Dict[Any, torch.Tensor]) -> None:
        """Copy ``saved`` into ``into`` (``_match_named``), creating each tensor where missing
        (``flat.accumulator()``: on the parameters' device, whatever the checkpoint's)."""
        for key, tensor in self._match_named(saved, flats, what).items():
            into.setdefault(key, flats[key].accumulator()).copy_(tensor)

    def _load_base_state(self, state: Dict[str, Any], required=()) -> None:
        """Check that ``state`` is this wrapper's kind of state dict, then restore the common part."""
        name = type(self).__name__
        if not isinstance(state, dict):
            raise ValueError(f"{name}.load_state_dict expects the dict from {name}.state_dict(), "
                             f"got {type(state).__name__}")
        if "algorithm" in state and state["algorithm"] != name:
            raise ValueError(f"state_dict is from {state['algorithm']}, not {name}")
        missing = [key for key in ("optimizer", "steps", "comm_bytes", *required) if key not in state]
        if missing:
            hint = (" (it looks like a torch.optim optimizer's state_dict: load that with "
                    "opt.optimizer.load_state_dict)") if {"state", "param_groups"} <= set(state) else ""
            raise ValueError(f"state_dict is not from {name}.state_dict(): it lacks {missing}{hint}")
        saved, here = state.get("world"), self._world()
        if saved is not None and any(saved.get(key) != here[key] for key in self._state_world_keys):
            # Every rank compares its own dict with the same world: all refuse alike, before any collective.
            raise ValueError(f"{name}.load_state_dict: the state_dict comes from another world ({saved['size']} ranks "
                             f"in groups {saved['groups']}) than this one ({here['size']} ranks in groups "
                             f"{here['groups']}); its state names ranks of that world (leaders, shards), so it "
                             f"resumes only with the same ranks and groups")
        self.optimizer.load_state_dict(state["optimizer"])
        self._steps = int(state["steps"])
        self.comm.bytes = int(state["comm_bytes"])
