"""What every distributed optimizer wrapper shares.

A wrapper holds a ``torch.optim.Optimizer`` (the gradient force) and the model, by
composition. It packs the model's parameters (and buffers) into flat buffers once, counts
steps, talks through one ``Collectives`` object (which counts ``comm_bytes``), checks at
construction that every rank wraps the same model, and offers ``close()`` / ``with opt:`` and
``state_dict()``.
"""
from __future__ import annotations

import hashlib
import logging
from typing import Any, Dict, List, Optional

import torch

from horovod_leader import abort
from horovod_leader.comm import Collectives
from horovod_leader.errors import AllWorkersDiverged
from horovod_leader.flat import FlatBuffer, key_name, pack
from horovod_leader.topology import Topology

log = logging.getLogger("horovod_leader")


def model_signature(model: torch.nn.Module) -> str:
    """A short digest of every parameter's and buffer's name, shape and dtype."""
    parts = [f"p:{name}:{tuple(t.shape)}:{t.dtype}" for name, t in model.named_parameters()]
    parts += [f"b:{name}:{tuple(t.shape)}:{t.dtype}" for name, t in model.named_buffers()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16] + f"/{len(parts)}"


def scalar_loss(loss) -> Any:
    """Accept a 0-d (or one-element) tensor or a real number as this rank's loss."""
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise ValueError(f"loss must be a scalar (0-d tensor or float), got a tensor of shape {tuple(loss.shape)}")
        return loss.detach().reshape(())
    if isinstance(loss, bool) or not isinstance(loss, (int, float)):
        raise ValueError(f"loss must be a scalar (0-d tensor or float), got {type(loss).__name__}")
    return float(loss)


class DistributedWrapper:
    """Base of LSGD, GRAWA, EASGD, LocalSGD and DataParallel (not used directly)."""

    #: name used in Horovod collective names and in logs
    name = "wrapper"

    def __init__(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module, *,
                 topology: Optional[Topology] = None, broadcast_buffers: bool = True):
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
        for what, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if tensor.dtype == torch.bfloat16 and tensor.device.type != "cuda":
                raise ValueError(f"model: {what!r} is bfloat16 on {tensor.device}, which Horovod cannot send "
                                 "(it refuses bfloat16 tensors on the CPU); keep the master weights in float32 "
                                 "(torch.autocast for bfloat16 compute) or move the model to a GPU")
        abort.install_excepthook()  # one rank's uncaught exception ends the job, not just that rank
        # Everything above is local; from here on ranks communicate.
        self.comm = Collectives(self.name)
        self._check_same_model()
        self.params: Dict[Any, FlatBuffer] = pack(model.parameters())
        float_buffers = [b for b in model.buffers() if b.is_floating_point()] if broadcast_buffers else []
        other_buffers = [b for b in model.buffers() if not b.is_floating_point()] if broadcast_buffers else []
        self.float_buffers: Dict[Any, FlatBuffer] = pack(float_buffers)
        self.other_buffers: Dict[Any, FlatBuffer] = pack(other_buffers)

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

    def _check_same_model(self) -> None:
        """Every rank must wrap the same architecture; compare digests with one all-gather."""
        mine = model_signature(self.model)
        everyone = self.comm.allgather_object(mine, name="model_signature")
        odd = [rank for rank, sig in enumerate(everyone) if sig != everyone[0]]
        if odd:
            raise ValueError(f"model differs across ranks: ranks {odd} have parameters or buffers whose names, shapes "
                             f"or dtypes differ from rank 0's (signatures {sorted(set(everyone))})")

    def _check_packed(self) -> None:
        for flat in list(self.params.values()) + list(self.float_buffers.values()) + list(self.other_buffers.values()):
            if not flat.still_packed():
                raise RuntimeError(f"{type(self).__name__}: the model's parameters or buffers were re-allocated after "
                                   "wrapping (for example by model.to()); move the model before wrapping it")

    def _params_finite(self) -> bool:
        return all(bool(torch.isfinite(flat.flat).all()) for flat in self.params.values())

    def _healthy(self) -> bool:
        """Finite parameters and floating buffers: only such a worker may enter an average."""
        return self._params_finite() and all(bool(torch.isfinite(flat.flat).all())
                                             for flat in self.float_buffers.values())

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
        """``hvd.broadcast_optimizer_state`` on the wrapped optimizer (the wrapper's own
        ``state_dict`` is not an optimizer's, so pass ``opt.optimizer`` when calling Horovod)."""
        import horovod.torch as hvd

        hvd.broadcast_optimizer_state(self.optimizer, root_rank=root_rank)

    def _begin_step(self, loss):
        """What every ``step`` starts with: check the loss and the packing, count the step."""
        if loss is not None:
            loss = scalar_loss(loss)
        self._check_packed()
        self._steps += 1
        self._reset_since_step = False
        return loss

    # ------------------------------------------------------------------ refresh rounds
    def _setup_rounds(self, asynchronous: bool, steps_per_round: int) -> None:
        """Synchronous rounds run at once; asynchronous ones are scheduled on the global step
        count, one round per ``size * steps_per_round`` steps of all ranks together."""
        from horovod_leader.async_schedule import AsyncSchedule, RefreshDriver, make_step_counter

        self.asynchronous = asynchronous
        self._driver = RefreshDriver()
        self._schedule = (AsyncSchedule(self.size * steps_per_round, make_step_counter(), self._driver)
                          if asynchronous else None)

    def _round(self, number: int):
        """The refresh as a generator of posted collectives (see ``async_schedule``)."""
        raise NotImplementedError

    def _step_then_round(self, loss) -> None:
        """The wrapped optimizer's step, then a round every ``self.period`` steps (synchronous)
        or the step counted toward the global schedule (asynchronous)."""
        self._begin_step(loss)
        self.optimizer.step()
        if self.asynchronous:
            self._schedule.after_step(self._round, self._steps)
        elif self._steps % self.period == 0:
            self._run_round(self._steps // self.period)

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
            self._driver.start(self._round(self._steps // max(getattr(self, "period", 1), 1), joined=True),
                               block=True)

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
        if self._schedule is not None:
            self._schedule.close(self._round, self._steps)
        else:
            self._join_rounds()
        import horovod.torch as hvd
        hvd.join()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Closes; but leaving by an exception ends the whole job (``horovod_leader.abort``):
        entering ``close()`` would leave the other ranks waiting in this step's collectives, or
        training on without this worker as if nothing had happened."""
        if exc_type is not None and abort.enabled():
            abort.abort_job(exc_type, exc, tb)
        self.close()

    def _base_state(self) -> Dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "steps": self._steps, "comm_bytes": self.comm.bytes,
                "algorithm": type(self).__name__}

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
        self.optimizer.load_state_dict(state["optimizer"])
        self._steps = int(state["steps"])
        self.comm.bytes = int(state["comm_bytes"])
