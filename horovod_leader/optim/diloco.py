r"""DiLoCo: local inner steps, then an outer Nesterov step on the averaged pseudo-gradient."""
from __future__ import annotations

import copy

from typing import Any, Dict, Optional

import torch

from horovod_leader.compression import Codec, check_compression, name_of
from horovod_leader.optim.averaging import MeanRound
from horovod_leader.optim.base import DistributedWrapper
from horovod_leader.validation import check_bool, check_real


class DiLoCo(DistributedWrapper):
    r"""DiLoCo (Douillard et al. 2023, arXiv 2311.08105) over Horovod.

    Every worker runs ``period`` = H inner steps with the wrapped (inner) optimizer; the paper
    uses AdamW. Then, with :math:`\theta` the outer parameters that every worker started the
    round from and :math:`\theta_i` the workers' parameters after their inner steps:

    .. math::

        \Delta = \theta - \frac1{n}\sum_{i\ \text{healthy}} \theta_i, \qquad
        m \leftarrow \mu\,m + \Delta, \qquad
        \theta \leftarrow \theta - \eta_{out}\,(\Delta + \mu\,m) \ \ (\text{Nesterov; else } \theta - \eta_{out} m)

    exactly ``torch.optim.SGD(lr=outer_lr, momentum=outer_momentum, nesterov=nesterov)`` on the
    pseudo-gradient :math:`\Delta` (it *is* that optimizer, over a copy of the parameters, so its
    first step sets :math:`m = \Delta`). Every worker then restarts from the new :math:`\theta`.
    One all-reduce per round (the parameters' sum, with a count of the healthy workers);
    floating buffers (batch-norm statistics) are replaced by their plain mean. With the outer
    learning rate 1 and no momentum it is local SGD.

    Shared conventions: ``step(loss)``, ``comm_bytes``, ``close()`` (ranks may stop at different
    step counts: one that closed early adds nothing to the mean, but keeps its outer state up
    to date), ``state_dict`` (with the outer parameters and the outer momentum), argument
    checks, and health: a worker whose parameters or buffers are not finite enters no mean and
    restarts from the new :math:`\theta`; with no healthy worker, every rank raises
    ``AllWorkersDiverged``. ``compression="bf16"``/``"int8"`` sends each worker's
    :math:`\theta_i - \theta` compressed (``horovod_leader.compression``).

    Args:
        optimizer: the inner optimizer over ``model``'s parameters.
        model: the model; rank 0's parameters and buffers are broadcast to every rank
            at construction and become the first :math:`\theta`.
        period: H, inner steps per round (default ``DEFAULT_PERIOD`` = 500, the paper's; the
            training command's default is 32, ``CLI_PERIOD``: its small models and short
            runs would see a handful of outer steps at 500).
        outer_lr: :math:`\eta_{out}` (paper: 0.7).
        outer_momentum: :math:`\mu` (paper: 0.9).
        nesterov: Nesterov momentum (paper: True).
        overlap: d, an integer in [0, ``period``): a round posted at step k is applied at step
            k + d on every rank, its correction computed from what this worker sent at step k
            (``_apply``), while the exchange crosses the links; 0: at once (the published
            method).
    """

    name = "diloco"
    _uses_node_sets = True
    DEFAULT_PERIOD = 500
    CLI_PERIOD = 32  # the training command's default; see ``period`` above
    DEFAULT_OUTER_LR = 0.7
    DEFAULT_OUTER_MOMENTUM = 0.9

    def __init__(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module, period: int = DEFAULT_PERIOD,
                 outer_lr: float = DEFAULT_OUTER_LR, outer_momentum: float = DEFAULT_OUTER_MOMENTUM,
                 nesterov: bool = True, *, compression: Optional[str | Codec] = None, broadcast_buffers: bool = True,
                 overlap: int = 0, topology=None):
        self.outer_lr = check_real("outer_lr", outer_lr, 0.0, float("inf"), low_open=True)
        self.outer_momentum = check_real("outer_momentum", outer_momentum, 0.0, 1.0, high_open=True)
        self.nesterov = check_bool("nesterov", nesterov)
        if self.nesterov and self.outer_momentum == 0.0:
            raise ValueError("nesterov=True needs outer_momentum > 0 (as torch.optim.SGD)")
        self.compression = check_compression(compression)
        super().__init__(optimizer, model, period=period, topology=topology, broadcast_buffers=broadcast_buffers,
                         overlap=overlap)
        self._mean = MeanRound(self.compression)
        # Every worker starts each round from the same outer parameters: rank 0's, to begin with.
        for name, flat in self._exchanged().items():
            self.comm.wait(self.comm.broadcast_async_(flat.flat, 0, name=f"start.{name}"))
        # The outer parameters: a copy of the packed buffers, stepped by a real torch.optim.SGD.
        # (in float32 for a half-precision model: the outer step is an average's arithmetic)
        self.outer: Dict[Any, torch.Tensor] = {key: flat.accumulator().copy_(flat.flat)
                                               for key, flat in self.params.items()}
        self._outer_params = [torch.nn.Parameter(t, requires_grad=False) for t in self.outer.values()]
        self.outer_optimizer = torch.optim.SGD(self._outer_params, lr=self.outer_lr, momentum=self.outer_momentum,
                                               nesterov=self.nesterov)
        self._setup_rounds(False, self.period)

    def _settings(self) -> Dict[str, Any]:
        return {**super()._settings(), "period": self.period, "outer_lr": self.outer_lr,
                "outer_momentum": self.outer_momentum, "nesterov": self.nesterov,
                "compression": name_of(self.compression)}

    def centre(self) -> Dict[Any, torch.Tensor]:
        r"""The outer parameters :math:`\theta`, alike on every rank: what every worker
        restarts from after a round (float32 for a half-precision model)."""
        return self.outer

    def step(self, loss=None) -> None:
        """One inner step; every ``period`` steps, the outer round."""
        self._step_then_round(loss)

    def _round(self, number: int, joined: bool = False):
        """Average, outer step, restart; ``joined``: this rank has closed and adds nothing."""
        outcome = yield from self._average(self._mean, number, joined, refs=self.outer, what="outer round")
        yield from self._hold(outcome)
        self._apply(outcome)

    def _apply(self, outcome) -> None:
        r"""The outer step on the pseudo-gradient, then every worker restarts from the new
        :math:`\theta`. Overlapped by d steps (the delayed outer step of Streaming DiLoCo,
        arXiv 2501.18512, and of eager updates, arXiv 2502.12996): the pseudo-gradient is that of
        what the workers sent at step k, and at step k + d each worker keeps the inner steps it
        took meanwhile, :math:`x \leftarrow \theta_{new} + (x - s)` with :math:`s = x_k`."""
        reset = self._apply_mean(outcome)
        with torch.no_grad():
            for key, outer in zip(self.outer, self._outer_params):
                outer.grad = (outer.data - outcome["params"][key]).to(outer.dtype)  # the pseudo-gradient
        self.outer_optimizer.step()
        if outcome["joined"]:
            return
        self._correct_(self.params, self.outer, 1.0, reset=reset)
        self._correct_(self.float_buffers, outcome["buffers"], 1.0, which="buffers", reset=reset)
        if reset:
            self._log_recovery("the new outer parameters")

    _required_state = ("outer", "outer_optimizer")

    def _state(self) -> Dict[str, Any]:
        # a copy, as the outer parameters are: the live momentum keeps changing after the call
        return {"outer": self._named(self.outer), "outer_optimizer": copy.deepcopy(self.outer_optimizer.state_dict())}

    def _load_state(self, state: Dict[str, Any]) -> None:
        self._restore_named(state["outer"], self.params, "outer", self.outer)  # in place: the outer SGD's parameters
        self.outer_optimizer.load_state_dict(state["outer_optimizer"])
