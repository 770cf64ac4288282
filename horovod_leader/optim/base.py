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

from horovod_leader.comm import Collectives
from horovod_leader.flat import FlatBuffer, pack
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
        self.asynchronous = False
        self._schedule = None  # an AsyncSchedule in asynchronous mode (see _setup_rounds)
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

    def _log_recovery(self, source: str) -> None:
        """A diverged worker was reset to ``source``: log it and restart its optimizer state."""
        log.warning("horovod_leader: rank %d diverged (non-finite loss, gradient or parameters) at step %d; "
                    "reset to %s", self.rank, self._steps, source)
        self.optimizer.state.clear()
        self.recoveries += 1

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
        """The wrapped optimizer's param groups (so LR schedulers can be pointed at either)."""
        return self.optimizer.param_groups

    def _begin_step(self, loss):
        """What every ``step`` starts with: check the loss and the packing, count the step."""
        if loss is not None:
            loss = scalar_loss(loss)
        self._check_packed()
        self._steps += 1
        return loss

    # ------------------------------------------------------------------ refresh rounds
    def _setup_rounds(self, asynchronous: bool, steps_per_round: int) -> None:
        """Synchronous rounds run at once; asynchronous ones are scheduled on the global step
        count, one round per ``size * steps_per_round`` steps of all ranks together."""
        from horovod_leader.async_schedule import AsyncSchedule, GlobalStepCounter, RefreshDriver

        self.asynchronous = asynchronous
        self._driver = RefreshDriver()
        self._schedule = (AsyncSchedule(self.size * steps_per_round, GlobalStepCounter(), self._driver)
                          if asynchronous else None)

    def _round(self, number: int):
        """The refresh as a generator of posted collectives (see ``async_schedule``)."""
        raise NotImplementedError

    def _run_round(self, number: int) -> None:
        """A synchronous round: post, wait, apply, before ``step`` returns."""
        self._driver.start(self._round(number), block=True)

    @property
    def rounds_history(self):
        """Asynchronous mode: (round, global step total, this rank's steps) when it started each round."""
        return list(self._schedule.history) if self._schedule is not None else []

    def close(self) -> None:
        """Leave the collective schedule: returns on every rank once every rank has closed.

        Call it when this rank stops stepping (``with opt:`` calls it on exit). Asynchronous
        wrappers keep joining the refreshes that fall due until every rank has closed, so
        ranks may stop at different step counts; in the synchronous ones every rank must have
        taken the same number of steps.
        """
        if self._closed:
            return
        self._closed = True
        if self._schedule is not None:
            self._schedule.close(self._round, self._steps)
        import horovod.torch as hvd
        hvd.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _base_state(self) -> Dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "steps": self._steps, "comm_bytes": self.comm.bytes,
                "algorithm": type(self).__name__}

    def _load_base_state(self, state: Dict[str, Any]) -> None:
        if state.get("algorithm", type(self).__name__) != type(self).__name__:
            raise ValueError(f"state_dict is from {state['algorithm']}, not {type(self).__name__}")
        self.optimizer.load_state_dict(state["optimizer"])
        self._steps = int(state["steps"])
        self.comm.bytes = int(state["comm_bytes"])
